"""The host side of Bulkhead: what runs on a host machine (agent, runtime drivers, host tasks).

The boundary of issue 16: nothing in this package imports Django, a model or a portal service. It talks
to the portal only through `compute.host.link.PortalLink` (the host API over HTTP with the host's own
credential, or the in-process link on the portal's own machine). The low-level drivers it uses
(`compute.runtimes`, `compute.network`, `imaging.store`) are Django-free too.
`tests/compute/test_host_boundary.py` holds it to that.
"""
