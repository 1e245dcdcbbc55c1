"""The multi-user columnhub service: an HTTP API over the same delivery as ``columnhub.deliver``.

Nothing here is imported by ``import columnhub``; the service needs the
``service`` extra (``pip install 'columnhub[service]'``).

Modules: ``config`` (settings), ``app`` (FastAPI routes, the one place errors
become HTTP statuses), ``db`` (SQLAlchemy models, the queue), ``jobs`` (the
runner that delivers queued work), ``auth`` (bearer tokens: a static token file
or OIDC/JWT), ``access`` (data roots), ``metrics`` (Prometheus), ``dashboard``
(the page at ``/``).
"""
