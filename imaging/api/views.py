"""REST API for images and the layer store."""

from __future__ import annotations

import errno
import secrets
import uuid
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.core.files.uploadhandler import FileUploadHandler
from django.db.models import Count, Prefetch, QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, status
from rest_framework.decorators import action
from rest_framework.exceptions import APIException, NotFound, PermissionDenied
from rest_framework.parsers import FormParser, JSONParser, MultiPartParser
from rest_framework.request import Request
from rest_framework.response import Response

from imaging import services
from imaging.api import serializers as s
from imaging.filtersets import ImageFilterSet
from imaging.models import Image, ImageLayer
from portal.api.viewsets import PermissionLayerViewSet
from portal.errors import Unavailable
from portal.models import Operation
from portal.permissions import acts_as_operator
from tenants.api.serializers import OperationSerializer
from tenants.api.views import UUID_LOOKUP, require_operator
from tenants.models import Tenant


class PayloadTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_detail = "The upload is larger than this portal accepts."
    default_code = "too_large"


class StoredUpload(UploadedFile):
    """An upload already written to the store's ingest area."""

    def __init__(self, path: Path, name: str, size: int, content_type: str) -> None:
        super().__init__(file=None, name=name, content_type=content_type, size=size)
        self.path = path

    def temporary_file_path(self) -> str:
        return str(self.path)

    def close(self) -> None:
        pass


class StoreUploadHandler(FileUploadHandler):
    """Streams the one uploaded file into the ingest area; past the limit it stops and keeps nothing."""

    def __init__(self, request: Any, limit: int) -> None:
        super().__init__(request)
        self.limit = limit
        self.path: Path | None = None
        self.file: Any = None
        self.received = 0

    def handle_raw_input(
        self, input_data: Any, META: Any, content_length: int, *args: Any, **kwargs: Any
    ) -> None:
        # Multipart framing adds a little; a body much larger than the limit is refused unread.
        if content_length and content_length > self.limit + 64 * 1024:
            raise PayloadTooLarge(f"The upload is larger than {self.limit} bytes.")

    def new_file(self, field_name: str, file_name: str, *args: Any, **kwargs: Any) -> None:
        super().new_file(field_name, file_name, *args, **kwargs)
        if self.path is not None:
            self.discard()
            raise PayloadTooLarge("Upload one archive per request.")
        self.path = services.upload_dir() / f"upload-{secrets.token_urlsafe(16)}.tar"
        self.file = self.path.open("xb")

    def receive_data_chunk(self, raw_data: bytes, start: int) -> None:
        self.received += len(raw_data)
        if self.received > self.limit:
            self.discard()
            raise PayloadTooLarge(f"The upload is larger than {self.limit} bytes.")
        try:
            self.file.write(raw_data)
        except OSError as exc:
            self.discard()
            if exc.errno == errno.ENOSPC:
                raise Unavailable("The image store is out of space; an operator must free some.") from None
            raise
        return None

    def file_complete(self, file_size: int) -> StoredUpload | None:
        assert self.path is not None
        self.file.close()
        return StoredUpload(self.path, self.file_name or "archive", file_size, self.content_type or "")

    def upload_interrupted(self) -> None:
        self.discard()

    def discard(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def shared_layer_ids(user: Any, images: list[Image]) -> set[int]:
    """Layers of these images that another image the user can see also uses (one query)."""
    layer_ids = {il.layer_id for image in images for il in image.image_layers.all()}
    if not layer_ids:
        return set()
    rows = (
        ImageLayer.objects.filter(layer_id__in=layer_ids, image__in=Image.objects.for_user(user, "view"))
        .values("layer_id")
        .annotate(n=Count("image_id", distinct=True))
        .filter(n__gt=1)
    )
    return {row["layer_id"] for row in rows}


class ImageViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, PermissionLayerViewSet):
    model = Image
    serializer_class = s.ImageSerializer
    filterset_class = ImageFilterSet
    lookup_value_regex = UUID_LOOKUP
    ordering_fields = ["name", "tag", "created_at", "size"]
    http_method_names = ["get", "post", "delete", "head", "options"]
    parser_classes = [JSONParser, MultiPartParser, FormParser]
    # Publishing needs to see the image; the operator check follows.
    action_overrides = {"publish": "view"}

    def base_queryset(self) -> QuerySet[Image]:
        layers = ImageLayer.objects.select_related("layer").order_by("position")
        return Image.objects.select_related("tenant", "operation").prefetch_related(
            Prefetch("image_layers", layers)
        )

    def initialize_request(self, request: Any, *args: Any, **kwargs: Any) -> Request:
        drf_request = super().initialize_request(request, *args, **kwargs)
        if getattr(self, "action", None) == "import_archive":
            limit = int(getattr(settings, "BULKHEAD_MAX_UPLOAD_BYTES", 8 * 1024**3))
            request.upload_handlers = [StoreUploadHandler(request, limit)]
        return drf_request

    def list(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        queryset = self.filter_queryset(self.get_queryset())
        page = self.paginate_queryset(queryset)
        images = list(page if page is not None else queryset)
        context = {**self.get_serializer_context(), "shared_layers": shared_layer_ids(request.user, images)}
        data = s.ImageSerializer(images, many=True, context=context).data
        return self.get_paginated_response(data) if page is not None else Response(data)

    def retrieve(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        image = self.get_object()
        context = {**self.get_serializer_context(), "shared_layers": shared_layer_ids(request.user, [image])}
        return Response(s.ImageSerializer(image, context=context).data)

    def destroy(self, request: Request, pk: str) -> Response:
        services.delete_image(actor=self.actor, image=self.get_object())
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _tenant(self, tenant_id: Any) -> Tenant | None:
        """The tenant to act in ("operate"); None is a public image (the service checks operators)."""
        if tenant_id is None:
            return None
        tenant = Tenant.objects.for_user(self.request.user, "operate").filter(pk=tenant_id).first()
        if tenant is None:
            self.tenant_concerned = (
                Tenant.objects.for_user(self.request.user, "view").filter(pk=tenant_id).first()
            )
            if self.tenant_concerned is None:
                raise NotFound("No such tenant.")
            raise PermissionDenied("Your role does not allow adding images to this tenant.")
        return tenant

    def _refuse_before_the_body(self) -> None:
        """Whoever may not add images anywhere (viewers, read-only tokens) is refused before one byte
        of the upload is read (DRF parses the body lazily, on `request.data`)."""
        tenant_id = self.request.query_params.get("tenant")
        if tenant_id:
            try:
                uuid.UUID(tenant_id)
            except ValueError:
                raise NotFound("No such tenant.") from None
            self._tenant(tenant_id)
            return
        user = self.request.user
        if not acts_as_operator(user, write=True) and not Tenant.objects.for_user(user, "operate").exists():
            raise PermissionDenied("Your role does not allow adding images.")

    def _accepted(self, op: Operation) -> Response:
        return Response(OperationSerializer(op).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=s.ImportSerializer, responses={202: OperationSerializer})
    @action(detail=False, methods=["post"], url_path="import", url_name="import")
    def import_archive(self, request: Request) -> Response:
        """Upload an image archive (multipart `archive`); imported by an operation.

        `?tenant=<id>` in the query string lets the role in that tenant be checked before the body is read.
        """
        self._refuse_before_the_body()
        upload: Any = None
        try:
            serializer = s.ImportSerializer(data=request.data)
            upload = request.FILES.get("archive")
            serializer.is_valid(raise_exception=True)
            data = serializer.validated_data
            op = services.start_import(
                actor=self.actor,
                tenant=self._tenant(data.get("tenant")),
                name=data["name"],
                tag=data["tag"],
                upload=upload.path if isinstance(upload, StoredUpload) else None,
                directory=data.get("directory", ""),
            )
        except BaseException:
            if isinstance(upload, StoredUpload):
                upload.path.unlink(missing_ok=True)
            raise
        return self._accepted(op)

    @extend_schema(request=s.PullSerializer, responses={202: OperationSerializer})
    @action(detail=False, methods=["post"])
    def pull(self, request: Request) -> Response:
        """Pull an image from an allowlisted registry; pulled by an operation."""
        serializer = s.PullSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = serializer.validated_data
        op = services.start_pull(
            actor=self.actor,
            tenant=self._tenant(data.get("tenant")),
            reference=data["reference"],
            name=data.get("name", ""),
            tag=data.get("tag", ""),
            username=data.get("username", ""),
            password=data.get("password", ""),
        )
        return self._accepted(op)

    @extend_schema(request=s.TagSerializer, responses={201: s.ImageSerializer})
    @action(detail=True, methods=["post"])
    def tag(self, request: Request, pk: str) -> Response:
        """A new name:tag for the same image in the same tenant."""
        image = self.get_object()
        serializer = s.TagSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        copy = services.tag_image(actor=self.actor, image=image, **serializer.validated_data)
        return Response(s.ImageSerializer(self.base_queryset().get(pk=copy.pk)).data, status=201)

    @extend_schema(request=s.TagSerializer, responses={201: s.ImageSerializer})
    @action(detail=True, methods=["post"])
    def publish(self, request: Request, pk: str) -> Response:
        """Operators: publish a copy of an image as public."""
        image = self.get_object()
        require_operator(self, "publish images")
        serializer = s.TagSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        copy = services.publish_image(actor=self.actor, image=image, **serializer.validated_data)
        return Response(s.ImageSerializer(self.base_queryset().get(pk=copy.pk)).data, status=201)


class StoreViewSet(PermissionLayerViewSet):
    """The layer store: usage (operators see the store; members their tenants) and gc (operators)."""

    model = Image
    serializer_class = s.StoreUsageSerializer
    pagination_class = None
    filter_backends: list[Any] = []

    @extend_schema(responses=s.StoreUsageSerializer)
    def list(self, request: Request) -> Response:
        return Response(services.store_usage(request.user))

    @extend_schema(request=None, responses={202: OperationSerializer})
    @action(detail=False, methods=["post"])
    def gc(self, request: Request) -> Response:
        require_operator(self, "collect garbage in the layer store")
        op = services.start_gc(actor=self.actor)
        return Response(OperationSerializer(op).data, status=status.HTTP_202_ACCEPTED)
