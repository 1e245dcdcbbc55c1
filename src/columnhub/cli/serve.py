"""``columnhub serve``: run the multi-user HTTP service (FastAPI under uvicorn).

Every flag is also a key of the ``--config`` YAML file (``--data-root`` is
``data_roots``, ``--url-prefix`` is ``url_prefixes``, the others their name
with ``_``); a flag given overrides the file. SIGTERM or Ctrl-C stop the
service cleanly: no new connections, the runners stop (a request being
delivered is resumed by the next start, or by another replica), the
``LocalCluster`` closes; then the usual exit codes (143, 130) of the CLI.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

__all__ = ["register", "run"]


def register(sub: Any) -> None:
    """Add the ``serve`` sub-command."""
    p = sub.add_parser(
        "serve",
        help="run the multi-user HTTP service",
        description=(
            "Run the columnhub HTTP service: requests over HTTP are delivered by the same code "
            "as 'columnhub deliver', on a thread pool, a Dask LocalCluster or a Dask scheduler. "
            "Every flag can also be given in the --config YAML file."
        ),
    )
    p.add_argument("--config", metavar="FILE", help="YAML config file (flags override it)")
    p.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="TCP port (default 8000; 0: any free port)")
    p.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help=(
            "where deliveries run: 'local' for a Dask LocalCluster of --workers processes, or "
            "a scheduler address (tcp://host:8786); default: threads in the service process"
        ),
    )
    p.add_argument("--workers", type=int, metavar="N", help="threads, or LocalCluster processes")
    p.add_argument(
        "--data-root",
        dest="data_roots",
        action="append",
        metavar="DIR",
        help="a folder requests may read (repeat for several; none: local paths are refused)",
    )
    p.add_argument(
        "--url-prefix",
        dest="url_prefixes",
        action="append",
        metavar="PREFIX",
        help="a URL prefix requests may read (root://host//store/; repeat for several)",
    )
    p.add_argument(
        "--token-file", metavar="FILE", help="static tokens (YAML of sha256 token hashes)"
    )
    p.add_argument("--oidc-issuer", metavar="URL", help="accept OIDC access tokens of this issuer")
    p.add_argument("--oidc-audience", metavar="AUD", help="the audience OIDC tokens must name")
    p.add_argument(
        "--database",
        metavar="URL",
        help="SQLAlchemy URL (default sqlite in --state-dir; postgresql+psycopg://... for replicas)",
    )
    p.add_argument(
        "--state-dir",
        metavar="DIR",
        help="the service's folder: results, database, cache (default ~/.local/share/columnhub-service)",
    )
    p.add_argument("--cache", metavar="LOC", help="column cache path or URL (default STATE_DIR/cache)")
    p.add_argument("--models", metavar="LOC", help="model registry (never taken from a request)")
    p.add_argument("--runners", type=int, metavar="N", help="jobs this replica runs at once")
    p.add_argument(
        "--result-ttl",
        metavar="AGE",
        help="remove results no request has used for AGE (7d, 12h, 30m; default: keep)",
    )
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=None,
        help="allow listening on a non-loopback address with no token file or OIDC issuer",
    )
    p.add_argument(
        "--log-level",
        choices=("critical", "error", "warning", "info", "debug"),
        help="server log level (default info)",
    )
    p.set_defaults(func=run)


#: flags that are :class:`~columnhub.service.config.ServiceConfig` fields
_SETTINGS = (
    "host", "port", "scheduler", "workers", "data_roots", "url_prefixes", "token_file",
    "oidc_issuer", "oidc_audience", "database", "state_dir", "cache", "models", "runners",
    "insecure_no_auth", "log_level", "result_ttl",
)


def run(args: argparse.Namespace) -> int:
    """Load the configuration, build the app and serve it until SIGTERM / Ctrl-C."""
    from columnhub._extras import require
    from columnhub.service.config import load_config

    config = load_config(args.config, **{k: getattr(args, k) for k in _SETTINGS})
    uvicorn = require("uvicorn", what="columnhub serve")
    require("fastapi", what="columnhub serve")
    from columnhub.service.app import create_app

    app = create_app(config)
    log_config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    log_config["loggers"]["columnhub"] = {  # the service's and its runners' messages
        "handlers": ["default"], "level": config.log_level.upper(), "propagate": False,
    }
    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=config.host,
            port=config.port,
            log_level=config.log_level,
            log_config=log_config,
            lifespan="on",
            timeout_graceful_shutdown=10,
        )
    )
    server.run()
    return 0 if server.started else 1
