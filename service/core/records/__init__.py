"""Inspection records: what the station said about each part, kept, reviewed and measured."""
