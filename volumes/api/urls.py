from rest_framework.routers import DefaultRouter

from volumes.api import views

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("volumes", views.VolumeViewSet, basename="volume")
router.register("snapshots", views.SnapshotViewSet, basename="snapshot")

urlpatterns = router.urls
