/* Starts Swagger UI on /docs (service/http/routes/console.py): a file, as the Content-Security-Policy allows no
 * inline script. The document is the service's own; no validator badge (it would call out to another site). */
"use strict";
window.addEventListener("DOMContentLoaded", () => {
  window.ui = SwaggerUIBundle({
    url: new URL("openapi.json", location.href).pathname, dom_id: "#swagger-ui", validatorUrl: null,
    deepLinking: true, showExtensions: true, showCommonExtensions: true,
    presets: [SwaggerUIBundle.presets.apis], layout: "BaseLayout",
  });
});
