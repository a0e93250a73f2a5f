"""The ``sonde`` command line."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sonde", description="Probes for every layer of a network while it trains.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train small networks on scikit-learn's digits with probes on")
    demo.add_argument("--store", default="sonde.db", help="SQLite store path (default: sonde.db)")
    demo.add_argument("--logdir", default="runs", help="TensorBoard/CSV directory (default: runs)")
    demo.add_argument("--epochs", type=int, default=3)
    demo.add_argument("--port", type=int, default=8080, help="port of the dashboard on 127.0.0.1 (default: 8080)")
    demo.add_argument("--no-serve", action="store_true", help="train and record only; do not serve the dashboard")
    serve = commands.add_parser("serve", help="serve the REST API and the dashboard (or one role of the server)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; others need --token)")
    serve.add_argument("--port", type=int, default=None,
                       help="port (default 8080 for all/frontend, 8081 evaluator, 8082 aggregator)")
    serve.add_argument("--store", default="sonde.db", help="SQLite path or postgresql://... URL (default: sonde.db)")
    serve.add_argument("--role", default="all", choices=["all", "aggregator", "evaluator", "frontend"],
                       help="what this process does (default: all three roles in one process)")
    serve.add_argument("--token", default=None, help="access token clients must send (default: $SONDE_TOKEN)")
    serve.add_argument("--evaluator-url", default=None, help="evaluator to use (default http://127.0.0.1:8081)")
    serve.add_argument("--frontend-url", default=None, help="frontend to report to (default http://127.0.0.1:8080)")
    serve.add_argument("--allow-origin", action="append", default=[], metavar="URL",
                       help="an origin besides the server's own whose pages may use it, e.g. the https://... "
                            "address a reverse proxy serves it at when the proxy does not pass Host on (repeatable)")
    replay = commands.add_parser("replay", help="send the Records remote probes left on disk while the server was down")
    replay.add_argument("spill_dir", nargs="?", default="sonde-spill", help="spill directory (default: sonde-spill)")
    replay.add_argument("--server", default=None, help="server URL (default: the one each probe was sending to)")
    replay.add_argument("--token", default=None, help="access token (default: $SONDE_TOKEN)")
    replay.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds (default 60)")
    from sonde.graph.cli import add_parser as add_graph_parser

    add_graph_parser(commands)
    from sonde.export import add_parser as add_export_parser

    add_export_parser(commands)
    from sonde.sinks.video import add_parser as add_record_parser

    add_record_parser(commands)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    if args.command == "serve":
        from sonde.errors import SondeError
        from sonde.server.app import serve as run_server

        try:
            run_server(host=args.host, port=args.port, store=args.store, role=args.role, token=args.token,
                       evaluator_url=args.evaluator_url, frontend_url=args.frontend_url,
                       allow_origins=args.allow_origin)
        except SondeError as exc:
            parser.exit(2, f"sonde serve: {exc}\n")
        return 0
    if args.command == "replay":
        import os

        from sonde.errors import SondeError
        from sonde.sinks.outbox import replay as replay_spill

        try:
            left = replay_spill(args.spill_dir, args.server, token=args.token or os.environ.get("SONDE_TOKEN"),
                                timeout=args.timeout)
        except SondeError as exc:
            parser.exit(2, f"sonde replay: {exc}\n")
        print(f"{left} request(s) still waiting in {args.spill_dir}" if left else "everything was delivered")
        return 1 if left else 0
    if args.command == "graph":
        from sonde.graph.cli import run as run_graph

        return run_graph(args)
    if args.command == "export":
        from sonde.export import run as run_export

        return run_export(args)
    if args.command == "record":
        from sonde.sinks.video import run as run_record

        return run_record(args)
    if args.command == "demo":
        from sonde.demo import print_dashboard, print_summary, run_demo, serve_dashboard
        from sonde.errors import SondeError

        dashboard = None
        if not args.no_serve:
            try:
                dashboard = serve_dashboard(args.store, port=args.port)
            except SondeError as exc:
                parser.exit(2, f"sonde demo: {exc}\n")
            print(f"Dashboard: {dashboard.url}  (watch the runs live while they train)", flush=True)
        result = run_demo(store=args.store, logdir=args.logdir, epochs=args.epochs)
        print_summary(result)
        if dashboard is not None:
            print_dashboard(dashboard.url, result.runs)
            dashboard.wait()
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
