"""``kpgen run``: the sync loop (``sync``), the health check servers of services with
``externalTrafficPolicy: Local`` and /healthz (``healthcheck``), /metrics (``metrics``), and
the log format (``logs``)."""
