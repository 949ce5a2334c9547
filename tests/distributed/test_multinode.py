# Two launcher processes acting as two nodes (node ranks 0 and 1, master on 127.0.0.1) run the GPT recipe with one
# pipeline stage per "node"; the losses must equal the single-node run's.
import json
import threading

import pytest
from conftest import DEMO_ARGS, free_port, run_recipe

pytestmark = pytest.mark.dist


def _losses(out_dir):
    records = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def test_two_nodes_reproduce_the_single_node_losses(demo_run, tmp_path):
    single_dir, _ = demo_run
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")  # never resolved: --no_ssh starts only the local node
    out_dir, port = tmp_path / "run", free_port()
    results = {}

    def node(rank: int) -> None:
        launcher = [
            "--hostfile",
            str(hostfile),
            "--no_ssh",
            "--node_rank",
            str(rank),
            "--master_addr",
            "127.0.0.1",
            "--master_port",
            str(port),
        ]
        results[rank] = run_recipe("gpt_pretrain.py", DEMO_ARGS, output_dir=out_dir, launcher=launcher)

    threads = [threading.Thread(target=node, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for rank, run in results.items():
        assert run.returncode == 0, f"node {rank}:\n" + run.stdout[-2000:] + run.stderr[-2000:]
    assert "WORLD INFO DICT: {'node0': [0], 'node1': [0]}" in results[0].stdout + results[0].stderr
    single, multi = _losses(single_dir), _losses(out_dir)
    assert [s for s, _ in multi] == [s for s, _ in single] and len(multi) == 8
    for (step, a), (_, b) in zip(single, multi):
        assert b == pytest.approx(a, rel=1e-6), f"step {step}: single node {a}, two nodes {b}"
