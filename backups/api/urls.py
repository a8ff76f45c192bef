from rest_framework.routers import DefaultRouter

from backups.api import views

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("backups", views.BackupViewSet, basename="backup")
router.register("backup-schedules", views.BackupScheduleViewSet, basename="backup-schedule")

urlpatterns = [
    *router.urls,
]
