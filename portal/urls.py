from django.urls import URLPattern, URLResolver, include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from portal.metrics import MetricsView

api_v1: list[URLPattern | URLResolver] = [
    path("", include("tenants.api.urls")),
    path("", include("imaging.api.urls")),
    path("", include("compute.api.urls")),
    path("", include("volumes.api.urls")),
    path("", include("backups.api.urls")),
    path("schema/", SpectacularAPIView.as_view(), name="schema"),
    path("docs/", SpectacularSwaggerView.as_view(url_name="api:schema"), name="swagger-ui"),
    path("redoc/", SpectacularRedocView.as_view(url_name="api:schema"), name="redoc"),
]

urlpatterns = [
    # Namespaced: the UI has pages of the same names (workload-detail, image-import, ...).
    path("api/v1/", include((api_v1, "api"), namespace="api")),
    path("metrics", MetricsView.as_view(), name="metrics"),
    path("", include("frontend.urls")),
]
