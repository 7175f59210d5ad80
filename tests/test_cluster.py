"""cluster.yaml, scripts/submit.sh and the shipped experiments: Ray's own validation, and a
real `ray job submit` of a tiny experiment to a head started on loopback."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pyarrow.parquet as pq
import yaml

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent


def test_cluster_yaml_passes_ray_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(yaml.safe_load((ROOT / "cluster.yaml").read_text()))
    validate_config(config)
    types = config["available_node_types"]
    assert types["head"]["resources"].get("driver", 0) > 0  # drivers live on the CPU head
    assert any(t["min_workers"] == 0 and t["max_workers"] > 0 for n, t in types.items() if n != "head")


def test_cluster_yaml_exposes_no_dashboard_or_job_port():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    ports = {(p["FromPort"], p["ToPort"]) for p in config["provider"]["security_group"]["IpPermissions"]}
    assert ports == {(22, 22)}
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head


def test_rayignore_keeps_outputs_and_envs_out_of_upload():
    ignored = (ROOT / ".rayignore").read_text().split()
    assert {".venv/", "runs/"} <= set(ignored)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def agent_ports() -> list[str]:
    # Another Ray cluster on this machine (the test session's) holds the default agent ports.
    names = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
             "runtime-env-agent-port", "ray-client-server-port")
    return [f"--{name}={free_port()}" for name in names]


def wait_for_dashboard(port: int, head: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout
    while time.time() < deadline:
        assert head.poll() is None, f"ray start --head exited: {log.read_text()[-3000:]}"
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/version", timeout=5)
            return
        except urllib.error.HTTPError:
            return  # it answers (token auth refuses an anonymous request)
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"dashboard on 127.0.0.1:{port} did not come up")


def test_ray_job_submit_runs_an_experiment(tmp_path):
    token = tmp_path / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",  # the same for `ray start` and the client
        "RAY_AUTH_TOKEN_PATH": str(token),
        "NEEDLEWORK_CACHE": str(tmp_path / "cache"),
    }
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    run_dir = tmp_path / "run"
    exp = tmp_path / "tiny.yaml"
    exp.write_text(textwrap.dedent(f"""
        name: submitted
        run_dir: {run_dir}
        model: {{name: mini, path: miniature, rope_base: 40000, max_context: 512}}
        miniature: {{n_layers: 1, n_heads: 2, n_kv_heads: 1, hidden: 32, intermediate: 64, context: 64, steps: 3,
                    batch_size: 4, warmup_steps: 1, qa_per_task: 3, min_accuracy: 0.0, check_probes: 4, threads: 1,
                    on_failed_check: warn}}  # a 3-step base passes no gate: warn and go on
        tasks:
          mdqa: {{variants: [real, base], n_train: 10, n_eval: 4, target_tokens: 160}}
        train: {{batch_size: 1, grad_accum: 1, max_steps: 2, max_length: 200}}
        evaluate: {{batch_size: 4, shard_size: 4, max_new_tokens: 4}}
        knockout: {{enabled: false}}
        patching: {{enabled: false}}
    """))
    start = [str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
             "--num-cpus=2", "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             "--disable-usage-stats", *agent_ports(), f"--temp-dir={tempfile.mkdtemp(prefix='nw-ray-')}"]  # short: socket paths
    # --block in its own session: stopping it stops this head only, not other Ray clusters on the
    # machine (a plain `ray stop` would kill every Ray process here, the test session's included).
    log = open(tmp_path / "head.log", "wb")
    head = subprocess.Popen(start, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_dashboard(dash, head, log=tmp_path / "head.log")
        for _ in range(30):  # the job agent comes up a little after the dashboard
            submit = subprocess.run(
                ["bash", str(ROOT / "scripts" / "submit.sh"), str(exp)],
                env={**env, "RAY_ADDRESS": f"http://127.0.0.1:{dash}", "RAY": str(BIN / "ray")},
                cwd=ROOT, capture_output=True, text=True, timeout=900,
            )
            # Not submitted yet: the job agent is still starting, or the busy head dropped the request.
            if not any(m in submit.stderr for m in ("No available agent", "ConnectionError")):
                break
            time.sleep(3)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
        assert "succeeded" in submit.stdout + submit.stderr
    finally:
        if head.poll() is None:
            os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(30)
    preds = pq.read_table(run_dir / "eval" / "mdqa" / "real" / "real" / "predictions.parquet")
    assert preds.num_rows == pq.read_table(run_dir / "data" / "mdqa" / "real" / "eval.parquet").num_rows
    assert (run_dir / "models" / "mdqa" / "real" / "adapter_model.safetensors").exists()
    assert (run_dir / "report" / "report.md").exists()
