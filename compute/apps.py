from django.apps import AppConfig


class ComputeConfig(AppConfig):
    name = "compute"

    def ready(self) -> None:
        """Tell the host code of this process (compute.host, which reads no setting) where it is: the
        machine's own configuration, and how it reaches the portal — the host API over HTTP with the
        host's own credential (a joined host's agent.env), or in process on the portal's machine."""
        from django.conf import settings

        from compute.host import config, link

        config.configure(
            config.LocalConfig(
                data_dir=settings.DATA_DIR,
                store_dir=settings.BULKHEAD_STORE_DIR,
                guest_dir=settings.BULKHEAD_GUEST_DIR,
                userns_pool=(settings.BULKHEAD_USERNS_POOL[0], settings.BULKHEAD_USERNS_POOL[1]),
                portal_url=settings.BULKHEAD_PORTAL_URL or "",
                credential=settings.BULKHEAD_HOST_CREDENTIAL or "",
                volume_pool=settings.BULKHEAD_VOLUME_POOL or "",
                volume_pool_gib=settings.BULKHEAD_VOLUME_POOL_GIB,
                operation_heartbeat_seconds=float(
                    getattr(settings, "BULKHEAD_OPERATION_HEARTBEAT_SECONDS", 15)
                ),
                backup_dir=settings.BULKHEAD_BACKUP_DIR,
                broker_url=settings.REDIS_URL,
                sample_seconds=settings.BULKHEAD_SAMPLE_SECONDS,
                create_ahead=settings.BULKHEAD_CREATE_AHEAD,
            )
        )
        if settings.BULKHEAD_PORTAL_URL and settings.BULKHEAD_HOST_CREDENTIAL:
            link.register_links(
                link.http_links(settings.BULKHEAD_PORTAL_URL, settings.BULKHEAD_HOST_CREDENTIAL)
            )
        else:
            from compute.host_reports import in_process_link

            link.register_links(in_process_link)
