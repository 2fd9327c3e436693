"""The README's commands, run the way the README writes them: each line is taken from README.md and run by bash in
a scratch working directory (so its relative paths work as written), with flags appended only for size, output
folders and loopback ports (argparse keeps the last value of a repeated option), so each runs in seconds.

Elsewhere: `make serve` (tests/services/test_serve_stack.py), `make test` (this suite). Not run by a test:
`make demo` (~11 minutes), `bench/bench_models.py` (~40 CPU seconds even at one repeat), `bench/bench_serving.py`
(starts Triton per backend) and `bench/gpu.sh` (needs a GPU).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from genie_models.checkpoints import latest_checkpoint
from genie_models.data import EpisodeDataset, generate_coinrun
from genie_models.dynamics import DYNAMICS_PRESETS
from genie_models.world_model import WorldModel
from tests.services.helpers import free_port, open_channel

README = Path(__file__).resolve().parents[1] / "README.md"
VENV = Path(sys.prefix)  # the README's `.venv/bin/genie` and `genie` both mean this environment's scripts
TRAINING_HEADING = "## Training your own world"
SERVING_HEADING = "## Serving (`genie.v1`)"


def readme_block(heading: str) -> list[str]:
    """The command lines of the first ``` block under `heading`, end-of-line comments removed."""
    section = README.read_text().split(heading, 1)[1]
    block = section.split("```", 2)[1]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip()]


def readme_command(heading: str, start: str) -> str:
    [line] = [line for line in readme_block(heading) if line.startswith(start)]
    return line


def readme_play_command() -> str:
    """The `genie play` line of the main-job section (written inline in backquotes)."""
    return re.search(r"`(\.venv/bin/genie play [^`]+)`", README.read_text()).group(1)


def run_line(line: str, cwd: Path, *flags: str, stdin: str | None = None,
             timeout: float = 300) -> subprocess.CompletedProcess:
    """Run one README line with bash in cwd (HOME=cwd, so `~/` is there too); fails the test on a non-zero exit."""
    command = line + "".join(" " + shlex.quote(flag) for flag in flags)
    environment = os.environ | {"HOME": str(cwd), "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", command], cwd=cwd, input=stdin, capture_output=True, text=True,
                            timeout=timeout, env=environment)
    assert result.returncode == 0, f"{command}\nexit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def write_prompt(path: Path, width: int = 90, height: int = 70) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    """A scratch directory as after `make demo` and the README's training lines, at small sizes: an untrained
    `tiny` world at out/demo/world and worlds/coinrun, a few CoinRun episodes in data/coinrun, any.png,
    prompt.png, and .venv linked to this environment."""
    directory = tmp_path_factory.mktemp("demo-done")
    WorldModel.from_preset("tiny").save(directory / "out/demo/world", step=0)
    (directory / "worlds").mkdir()
    (directory / "worlds/coinrun").symlink_to(directory / "out/demo/world")
    generate_coinrun(directory / "data/coinrun", num_episodes=4, steps_per_episode=20, heldout_fraction=0.5, seed=0,
                     progress=False)
    write_prompt(directory / "any.png")
    write_prompt(directory / "prompt.png", 50, 40)
    (directory / ".venv").symlink_to(VENV)
    return directory


# --- "Training your own world" ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_readme_training_lines_train_both_stages_and_export_the_world(tmp_path):
    """The data + training lines as written (the `coinrun` preset: the paper's sizes), one step of one 2-frame clip."""
    size = ("--steps", "1", "--batch-size", "1", "--clip-length", "2")
    run_line(readme_command(TRAINING_HEADING, "genie data coinrun"), tmp_path, "--episodes", "10", "--steps", "30")
    run_line(readme_command(TRAINING_HEADING, "genie train tokenizer"), tmp_path, *size)
    run_line(readme_command(TRAINING_HEADING, "genie train dynamics"), tmp_path, *size)
    dataset = EpisodeDataset.open(tmp_path / "data/coinrun")
    assert len(dataset.episodes) == 10 and dataset.frame_size == 64
    assert latest_checkpoint(tmp_path / "runs/tok").name == "step-00000001"
    assert latest_checkpoint(tmp_path / "runs/world").name == "step-00000001"
    world = WorldModel.load(tmp_path / "worlds/coinrun")
    assert world.tokenizer.config.d_model == 512 and world.dynamics.config.num_layers == 12  # the coinrun preset


# eval and render run on the untrained tiny world: evaluating a coinrun-preset world costs ~90 CPU seconds.
def test_readme_eval_line_writes_metrics_json_and_prints_the_table(demo_dir):
    result = run_line(readme_command(TRAINING_HEADING, "genie eval"), demo_dir, "--clips", "2", "--horizon", "2")
    metrics = json.loads((demo_dir / "metrics.json").read_text())
    assert metrics["num_clips"] == 2 and 0 < metrics["reconstruction_psnr"] < 60
    assert "reconstruction_ssim" in result.stdout and "copy prompt" in result.stdout  # the table, per horizon


def test_readme_render_line_writes_an_action_grid_gif(demo_dir):
    run_line(readme_command(TRAINING_HEADING, "genie render"), demo_dir, "--steps", "2")
    grid = Image.open(demo_dir / "grid.gif")
    assert grid.size[1] == 8 * 2 * 64  # one row per latent action of the tiny preset, frames upscaled 2x


def write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def test_readme_videos_line_ingests_a_folder_of_mp4s(tmp_path):
    videos = tmp_path / "videos" / "nested"
    videos.mkdir(parents=True)
    rng = np.random.default_rng(0)
    write_video(videos / "a.mp4", rng.integers(0, 256, (20, 72, 96, 3), dtype=np.uint8), fps=20)  # 1 s
    write_video(tmp_path / "videos" / "b.mp4", rng.integers(0, 256, (15, 48, 48, 3), dtype=np.uint8), fps=10)
    result = run_line(readme_command(TRAINING_HEADING, "genie data videos"), tmp_path)
    dataset = EpisodeDataset.open(tmp_path / "data/videos")
    assert "2 episodes" in result.stdout
    assert dataset.frame_size == 64 and sorted(episode.length for episode in dataset.episodes) == [10, 15]
    assert np.asarray(dataset.frames(0)).shape[1:] == (64, 64, 3)


@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_torchrun_line_trains_on_cpu_with_gloo(tmp_path, processes):
    """The README's torchrun line (which also checks that torchrun's own parser lets --run-dir through), with N
    processes on CPU and, besides the sizes, the tiny preset: one coinrun-preset step costs ~20 CPU seconds a rank."""
    generate_coinrun(tmp_path / "data/coinrun", num_episodes=4, steps_per_episode=20, heldout_fraction=0.25, seed=0,
                     progress=False)
    [line] = re.findall(r"^torchrun --nproc-per-node N .*$", README.read_text(), flags=re.MULTILINE)
    result = run_line(line.replace(" N ", f" {processes} "), tmp_path, "--preset", "tiny", "--steps", "2",
                      "--batch-size", "2", "--clip-length", "2", "--device", "cpu")
    assert latest_checkpoint(tmp_path / "runs/tok").name == "step-00000002"
    assert result.stdout.count("'codes_used'") == processes  # every rank trained and reported


@pytest.mark.slow
def test_torchrun_two_node_line_trains_with_both_nodes_on_loopback(tmp_path):
    """The README's multi-node line, run as two 'nodes' (node ranks 0 and 1) on this machine, one CPU process each,
    sharing the run directory as the README asks."""
    generate_coinrun(tmp_path / "data/coinrun", num_episodes=4, steps_per_episode=20, heldout_fraction=0.25, seed=0,
                     progress=False)
    [line] = re.findall(r"^torchrun --nnodes 2 .*$", README.read_text(), flags=re.MULTILINE)
    line = line.replace("--nproc-per-node 8", "--nproc-per-node 1").replace("HOST", "127.0.0.1")
    line = line.replace("--master-port 29500", f"--master-port {free_port()}")
    size = " --preset tiny --steps 2 --batch-size 2 --clip-length 2 --device cpu"
    environment = os.environ | {"PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"}
    nodes = [subprocess.Popen(["bash", "-c", line.replace(" R ", f" {rank} ") + size], cwd=tmp_path, env=environment,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs
    assert latest_checkpoint(tmp_path / "runs/tok").name == "step-00000002"
    assert all("'codes_used'" in stdout for stdout, _ in outputs)  # each node's rank trained and reported


# --- "Deploying": training across nodes on Kubernetes ------------------------------------------------------------

def test_readme_launch_k8s_lines_print_valid_manifests_and_submit_needs_a_cluster(tmp_path):
    """The dry-run line writes manifests that validate; the --submit lines, with no kubeconfig here, say so."""
    import kubernetes_validate
    import yaml

    lines = re.findall(r"^genie jobs launch-k8s .*$", README.read_text(), flags=re.MULTILINE)
    assert len(lines) == 3 and lines[0].endswith("> tokenizer.yaml")
    run_line(lines[0], tmp_path)
    manifests = list(yaml.safe_load_all((tmp_path / "tokenizer.yaml").read_text()))
    assert [item["kind"] for item in manifests] == ["Service", "Job"]
    assert manifests[1]["metadata"]["name"] == "genie-tokenizer-platformer-1"  # the README's `kubectl logs` line
    for item in manifests:
        kubernetes_validate.validate(item, "1.30.0", strict=True)
    for line in lines[1:]:
        environment = os.environ | {"HOME": str(tmp_path), "PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"}
        environment.pop("KUBECONFIG", None)
        result = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                                env=environment)
        assert result.returncode == 1 and "no cluster to submit to" in result.stderr, result.stderr[-2000:]


# --- `genie play` ------------------------------------------------------------------------------------------------

def test_readme_play_line_shows_frames_and_saves_them_until_q(demo_dir):
    result = run_line(readme_play_command(), demo_dir, stdin="3 3 1\n\n7\nq\n")
    out = demo_dir / "play"
    assert f"frames are saved to {Path('play')}/" in result.stdout
    assert sorted(path.name for path in out.glob("frame-*.png")) == [f"frame-{i:05d}.png" for i in range(5)]
    assert Image.open(out / "play.gif").format == "GIF"  # PIL merges repeated frames: an untrained world repeats
    assert Image.open(out / "frame-00004.png").size == (64, 64)
    frame_rows = [line for line in result.stdout.splitlines() if line.count("\u2580") == 64]
    assert len(frame_rows) == 5 * 32  # each of the 5 frames drawn as 64 columns x 32 rows
    assert "\x1b[38;2;" in frame_rows[0] and "\x1b[48;2;" in frame_rows[0]


@pytest.mark.parametrize("stdin", ["quit\n", "EXIT\n", "2\n"], ids=["quit", "exit", "end-of-input"])
def test_play_quits_cleanly_on_quit_words_and_end_of_input(demo_dir, tmp_path, stdin):
    result = run_line(readme_play_command(), demo_dir, "--out", str(tmp_path / "game"), "--no-show", stdin=stdin)
    steps = 1 if stdin == "2\n" else 0
    assert len(list((tmp_path / "game").glob("frame-*.png"))) == steps + 1 and (tmp_path / "game/play.gif").exists()
    assert f"saved {steps + 1} frames" in result.stdout and "\u2580" not in result.stdout


def test_play_takes_the_worlds_sampling_options_and_names_a_bad_one(demo_dir, tmp_path):
    result = run_line(readme_play_command(), demo_dir, "--out", str(tmp_path / "game"), "--no-show",
                      "--temperature", "0.5", "--maskgit-steps", "2", "--action-guidance", "1.5", stdin="1 2\nq\n")
    assert "saved 3 frames" in result.stdout
    command = readme_play_command() + " --no-show --action-guidance -1"
    refused = subprocess.run(["bash", "-c", command], cwd=demo_dir, input="q\n", capture_output=True, text=True,
                             timeout=120, env=os.environ | {"PATH": f"{VENV / 'bin'}:{os.environ['PATH']}"})
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines()[-1].startswith("genie play: error: action guidance must be a finite "
                                                              "number >= 0 (1 = as trained, this world's default is 3)")


def test_play_rejects_bad_input_with_a_hint_and_keeps_playing(demo_dir, tmp_path):
    result = run_line(readme_play_command(), demo_dir, "--out", str(tmp_path), "--no-show",
                      stdin="q1\n8\n1 x 2\n-1\n0,1\nq\n")
    for word in ("q1", "8", "x", "-1"):
        assert f"{word!r} is not an action: type numbers 0..7" in result.stdout
    assert "saved 3 frames" in result.stdout  # only `0,1` was played: a line with a bad word plays nothing


def test_play_stops_cleanly_on_ctrl_c(demo_dir, tmp_path):
    command = [str(VENV / "bin/genie"), "play", "--world", "out/demo/world", "--image", "any.png", "--no-show",
               "--out", str(tmp_path)]
    game = subprocess.Popen(command, cwd=demo_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        game.stdin.write("1\n")
        game.stdin.flush()
        deadline = time.monotonic() + 120
        while not (tmp_path / "frame-00001.png").exists():  # the step was played; the game waits for input
            assert time.monotonic() < deadline and game.poll() is None
            time.sleep(0.1)
        time.sleep(0.5)
        game.send_signal(signal.SIGINT)
        stdout, stderr = game.communicate(timeout=60)
    finally:
        if game.poll() is None:
            game.kill()
    assert game.returncode == 0 and "Traceback" not in stderr
    assert "saved 2 frames" in stdout and (tmp_path / "frame-00001.png").exists() and (tmp_path / "play.gif").exists()


# --- Serving: `genie serve gateway` + `genie client play` -----------------------------------------------------

def wait_serving(port: int, server: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    with open_channel(port) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                assert time.monotonic() < deadline, "the gateway did not start serving"
            time.sleep(0.2)


@pytest.mark.integration
def test_readme_serving_lines_serve_a_world_and_client_play_saves_frames(demo_dir, tmp_path):
    port = free_port()
    gateway_line = readme_command(SERVING_HEADING, "GENIE_GATEWAY_AUTH=none genie serve gateway")
    command = gateway_line + f" --port {port} --metrics-port 0"
    environment = os.environ | {"PATH": f"{VENV / 'bin'}:{os.environ['PATH']}", "GENIE_GATEWAY_HOST": "127.0.0.1"}
    server = subprocess.Popen(["bash", "-c", "exec env " + command], cwd=demo_dir, env=environment,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_serving(port, server)
        result = run_line(readme_command(SERVING_HEADING, "genie client play"), demo_dir,
                          "--address", f"127.0.0.1:{port}")
        listed = run_line(readme_command(SERVING_HEADING, "genie client models"), demo_dir,
                          "--address", f"127.0.0.1:{port}")
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    report = json.loads(result.stdout)
    assert report["frames"] == 5 and report["gif"] == "frames/play.gif"  # the prompt + actions 1,1,2,0
    tiny = DYNAMICS_PRESETS["tiny"]  # the sampling the world played: unset options are the world's own
    [model] = json.loads(listed.stdout)["models"]
    assert model["name"] == "coinrun" and model["default_action_guidance"] == tiny.action_guidance
    assert report["model"] == "coinrun" and report["sampling"] == {
        "seed": "0", "num_maskgit_steps": tiny.num_maskgit_steps, "temperature": tiny.temperature,
        "action_guidance": tiny.action_guidance}
    assert (demo_dir / "frames/play.gif").exists()
    assert Image.open(demo_dir / "frames/frame_004.png").size == (64, 64)
