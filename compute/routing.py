from django.urls import path

from compute.consumers import WorkloadConsoleConsumer

websocket_urlpatterns = [
    path("ws/workloads/<uuid:pk>/console/", WorkloadConsoleConsumer.as_asgi()),
]
