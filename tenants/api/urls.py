from rest_framework.routers import DefaultRouter

from tenants.api import views

router = DefaultRouter(trailing_slash=True)
router.register("tenants", views.TenantViewSet, basename="tenant")
router.register("memberships", views.MembershipViewSet, basename="membership")
router.register("tokens", views.ApiTokenViewSet, basename="token")
router.register("secrets", views.SecretViewSet, basename="secret")
router.register("quotas", views.QuotaViewSet, basename="quota")
router.register("audit", views.AuditEntryViewSet, basename="audit")
router.register("operations", views.OperationViewSet, basename="operation")
router.register("users", views.UserViewSet, basename="user")

urlpatterns = router.urls
