#!/usr/bin/env python3
"""A small real tensor-parallel engine for proving shoal's launch plumbing on GPUs.

Not an inference engine. Every rank holds one shard of a two-layer MLP
(column-parallel W1, row-parallel W2, as Megatron shards an MLP); each
generated token runs both layers on every rank and an all-reduce across them.
Rank 0 serves /health, /v1/models, /v1/completions and /metrics; the other
ranks follow commands broadcast from rank 0. Started by shoal's `command`
engine kind with RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, HOST, PORT and
SERVED_MODEL_NAME filled in from the elected head; the agent sets
CUDA_VISIBLE_DEVICES to the GPU it owns. NCCL on GPUs, gloo on CPUs (tests).
"""
import json
import os
import signal
import sys
import threading
import time
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import torch.distributed as dist

RANK = int(os.environ["RANK"])
WORLD = int(os.environ["WORLD_SIZE"])
MASTER = os.environ["MASTER_ADDR"]
MPORT = int(os.environ["MASTER_PORT"])
HOST = os.environ.get("HOST", "0.0.0.0")
PORT = int(os.environ.get("PORT", "8000"))
SERVED = os.environ.get("SERVED_MODEL_NAME", "torch-tp")
CUDA = torch.cuda.is_available()
DEV = torch.device("cuda:0") if CUDA else torch.device("cpu")
HIDDEN = 8192 if CUDA else 256
VOCAB = 32000


def log(msg):
    print(f"[rank {RANK}] {time.strftime('%H:%M:%S')} {msg}", flush=True)


log(f"init {'nccl' if CUDA else 'gloo'} world={WORLD} master={MASTER}:{MPORT} device={DEV}"
    + (f" ({torch.cuda.get_device_name(0)}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})" if CUDA else ""))
dist.init_process_group("nccl" if CUDA else "gloo", init_method=f"tcp://{MASTER}:{MPORT}",
                        rank=RANK, world_size=WORLD, timeout=timedelta(seconds=600))
gen = torch.Generator(device="cpu").manual_seed(1234 + RANK)
shard = HIDDEN // WORLD
dtype = torch.bfloat16 if CUDA else torch.float32
W1 = (torch.randn(HIDDEN, shard, generator=gen) / HIDDEN ** 0.5).to(DEV, dtype)   # column shard
W2 = (torch.randn(shard, HIDDEN, generator=gen) / shard ** 0.5).to(DEV, dtype)    # row shard
EMB = (torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(7)) / HIDDEN ** 0.5).to(DEV, dtype)
HEAD = EMB.t().contiguous()


def step(token):
    """One token: both shards compute, the partial outputs are all-reduced."""
    x = EMB[token].unsqueeze(0)
    h = torch.nn.functional.gelu(x @ W1)
    y = h @ W2
    dist.all_reduce(y)  # the collective that hangs if a rank dies
    return int(torch.argmax((y @ HEAD).float()).item()) % VOCAB


def generate(seed_token, n):
    out, tok = [], seed_token
    for _ in range(n):
        tok = step(tok)
        out.append(tok)
    return out


def command(op, a=0, b=0):
    t = torch.tensor([op, a, b], dtype=torch.int64, device=DEV)
    dist.broadcast(t, src=0)
    return [int(v) for v in t.tolist()]


dist.barrier()
log("all ranks joined")

if RANK != 0:
    while True:
        op, seed, n = command(0)
        if op == 1:
            generate(seed, n)
        elif op == 2:
            log("shutdown from rank 0")
            break
    dist.destroy_process_group()
    sys.exit(0)

lock = threading.Lock()
stats = {"running": 0, "tokens": 0, "requests": 0}


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def send(self, code, body, ctype="application/json"):
        b = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)

    def do_GET(self):
        if self.path == "/health":
            self.send(200, "")
        elif self.path == "/v1/models":
            self.send(200, {"object": "list", "data": [{"id": SERVED, "object": "model", "owned_by": "torch-tp"}]})
        elif self.path == "/metrics":
            m = (f'vllm:num_requests_running{{model_name="{SERVED}"}} {stats["running"]}\n'
                 f'vllm:num_requests_waiting{{model_name="{SERVED}"}} 0\n'
                 f'vllm:kv_cache_usage_perc{{model_name="{SERVED}"}} 0\n'
                 f'vllm:generation_tokens_total{{model_name="{SERVED}"}} {stats["tokens"]}\n')
            self.send(200, m, "text/plain; version=0.0.4")
        else:
            self.send(404, {"error": {"message": "Not Found", "type": "NotFoundError", "param": None, "code": 404}})

    def do_POST(self):
        if self.path not in ("/v1/completions", "/v1/chat/completions"):
            return self.send(404, {"error": {"message": "Not Found", "type": "NotFoundError", "param": None, "code": 404}})
        try:
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        except ValueError as e:
            return self.send(400, {"error": {"message": f"Invalid JSON: {e}", "type": "BadRequestError", "param": None, "code": 400}})
        if req.get("model") != SERVED:
            return self.send(404, {"error": {"message": f"The model `{req.get('model')}` does not exist.",
                                             "type": "NotFoundError", "param": "model", "code": 404}})
        n = max(1, min(int(req.get("max_tokens") or 16), 512))
        seed = sum(map(ord, json.dumps(req.get("prompt", req.get("messages", ""))))) % VOCAB
        t0 = time.time()
        with lock:  # one request at a time across the group
            stats["running"] = 1
            command(1, seed, n)
            toks = generate(seed, n)
            if CUDA:
                torch.cuda.synchronize()
            stats["running"] = 0
            stats["tokens"] += n
            stats["requests"] += 1
        text = " ".join(str(t) for t in toks)
        self.send(200, {"id": f"cmpl-{stats['requests']}", "object": "text_completion", "created": int(t0), "model": SERVED,
                        "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": "length"}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": n + 1},
                        "token_ids": toks, "ranks": WORLD, "seconds": round(time.time() - t0, 4)})


server = ThreadingHTTPServer((HOST, PORT), Handler)


def stop(*_):
    log("SIGTERM: telling the other ranks to stop")
    threading.Thread(target=server.shutdown, daemon=True).start()


signal.signal(signal.SIGTERM, stop)
log(f"serving http://{HOST}:{PORT} as {SERVED}")
server.serve_forever()
with lock:
    command(2)
dist.destroy_process_group()
