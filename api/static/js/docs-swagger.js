// /docs: Swagger UI (its dist files come from the fastapi-offline package, served under /static/vendor) on the
// OpenAPI document. No validator badge: it would fetch an image from a third-party host.
window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  validatorUrl: null,
});
