from rest_framework.routers import SimpleRouter

from imaging.api import views

router = SimpleRouter(trailing_slash=True)
router.register("images", views.ImageViewSet, basename="image")
router.register("store", views.StoreViewSet, basename="store")

urlpatterns = router.urls
