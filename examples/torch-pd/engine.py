#!/usr/bin/env python3
"""A small real prefill/decode engine that speaks vLLM's NixlConnector protocol.

Not an inference engine: a seeded 8-layer attention model over byte tokens.
It exists to prove shoal's disaggregated path on GPUs with real KV moving
between two engine processes, through the same router code that drives vLLM:

- The router sends the prefill engine (ROLE=prefill) the request with
  max_tokens 1 and kv_transfer_params {"do_remote_decode": true, ...}. It
  prefills the prompt into its paged KV pool (blocks of 16 tokens), keeps the
  blocks, and answers kv_transfer_params as vLLM's NixlConnector does:
  do_remote_prefill, remote_engine_id, remote_block_ids, remote_request_id,
  remote_host, remote_port (its side channel), tp_size.
- The router sends the decode engine (ROLE=decode) the client's request with
  those params. It meets the prefill engine on its side channel once per peer
  (the handshake, which shoal's pair warm-up pays), pulls the blocks into its
  own pool, tells the prefill engine to free them, computes the last prompt
  token and generates. Transports: cuda_ipc (the peer's KV pool mapped
  through a CUDA IPC handle, copied GPU to GPU) when both run on GPUs, else
  tcp (the blocks staged through host memory over the side channel).
- A failed pull answers 500 with KV_FAILURE_POLICY=fail (vLLM's default) or
  prefills locally with recompute. Held blocks the decode engine never pulled
  are freed after VLLM_NIXL_ABORT_REQUEST_TIMEOUT seconds (vLLM's default 480).
- Without kv_transfer_params either role serves the request alone, which is
  how a test compares a disaggregated answer with a local one.

Started by shoal's command engine kind with kvTransfer set; shoal fills in
ROLE from {{.KVRole}}, the side channel from VLLM_NIXL_SIDE_CHANNEL_HOST/PORT
and CUDA_VISIBLE_DEVICES from --gpus. Serves /health, /v1/models,
/v1/completions (streamed or not) and /metrics (vLLM's names).
"""
import base64
import json
import os
import signal
import socket
import socketserver
import struct
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

ROLE = os.environ.get("ROLE", "decode")
HOST = os.environ.get("HOST", "127.0.0.1")
PORT = int(os.environ.get("PORT", "8000"))
SERVED = os.environ.get("SERVED_MODEL_NAME", "torch-pd")
SIDE_HOST = os.environ.get("VLLM_NIXL_SIDE_CHANNEL_HOST", HOST)
SIDE_PORT = int(os.environ.get("VLLM_NIXL_SIDE_CHANNEL_PORT", "5600"))
POLICY = os.environ.get("KV_FAILURE_POLICY", "fail")
ABORT_TIMEOUT = float(os.environ.get("VLLM_NIXL_ABORT_REQUEST_TIMEOUT", "480"))
CUDA = torch.cuda.is_available()
TRANSPORT = os.environ.get("KV_TRANSPORT", "cuda_ipc" if CUDA else "tcp")
DEV = torch.device("cuda:0") if CUDA else torch.device("cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
LAYERS = int(os.environ.get("LAYERS", "8"))
HIDDEN = int(os.environ.get("HIDDEN", "4096" if CUDA else "256"))
HEADS = 32 if HIDDEN >= 1024 else 4
BLOCK = 16
NUM_BLOCKS = int(os.environ.get("NUM_BLOCKS", "4096" if CUDA else "256"))
VOCAB = 256  # byte tokens
ENGINE_ID = str(uuid.uuid4())


def log(msg):
    print(f"[{ROLE} {ENGINE_ID[:8]}] {time.strftime('%H:%M:%S')} {msg}", flush=True)


# Both roles build the same weights from the same seed, as two vLLM engines
# load the same checkpoint.
gen = torch.Generator().manual_seed(1234)


def weight(*shape):
    return (torch.randn(*shape, generator=gen) / shape[0] ** 0.5).to(DEV, DTYPE)


EMB = weight(VOCAB, HIDDEN) * VOCAB ** 0.5  # unit scale, as the positions
WQKV = [weight(HIDDEN, 3 * HIDDEN) for _ in range(LAYERS)]
WO = [weight(HIDDEN, HIDDEN) for _ in range(LAYERS)]
HEAD = weight(HIDDEN, VOCAB)
# The paged KV pool, one tensor so that one IPC handle maps it all:
# [K/V, layer, block, slot, hidden].
KV = torch.zeros(2, LAYERS, NUM_BLOCKS, BLOCK, HIDDEN, device=DEV, dtype=DTYPE)
BYTES_PER_BLOCK = KV[:, :, 0].numel() * KV.element_size()
free_blocks = list(range(NUM_BLOCKS))
pool_lock = threading.Lock()
compute_lock = threading.Lock()  # one request computes at a time
stats = {"running": 0, "waiting": 0, "prompt_tokens": 0, "generation_tokens": 0, "requests": 0,
         "pull_bytes": 0, "pull_seconds": 0.0, "pulls": 0, "pull_failures": 0, "handshakes": 0,
         "handshake_seconds": 0.0, "held_expired": 0}
log(f"device={DEV}" + (f" ({torch.cuda.get_device_name(0)}, CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})" if CUDA else "")
    + f" layers={LAYERS} hidden={HIDDEN} pool={NUM_BLOCKS}x{BLOCK} tokens ({KV.numel() * KV.element_size() / 2**30:.2f} GiB)"
    + f" transport={TRANSPORT} policy={POLICY}")


def alloc(n):
    with pool_lock:
        if n > len(free_blocks):
            raise MemoryError(f"KV pool full: {n} blocks asked, {len(free_blocks)} free")
        ids, free_blocks[:] = free_blocks[:n], free_blocks[n:]
        return ids


def release(ids):
    with pool_lock:
        free_blocks.extend(ids)


def usage():
    with pool_lock:
        return 1 - len(free_blocks) / NUM_BLOCKS


def blocks_for(n):
    return (n + BLOCK - 1) // BLOCK


def slots(ids, n):
    """The pool slots of the first n tokens of a sequence in blocks ids."""
    b = torch.tensor(ids, device=DEV).repeat_interleave(BLOCK)[:n]
    return b, torch.arange(n, device=DEV) % BLOCK


def attend(q, k, v, causal):
    t, s = q.shape[0], k.shape[0]
    hd = HIDDEN // HEADS
    q, k, v = (x.view(x.shape[0], HEADS, hd).transpose(0, 1) for x in (q, k, v))
    a = (q @ k.transpose(1, 2)).float() / hd ** 0.5
    if causal and t > 1:
        a = a.masked_fill(torch.ones(t, s, dtype=torch.bool, device=DEV).triu(s - t + 1), float("-inf"))
    o = torch.softmax(a, dim=-1).to(DTYPE) @ v
    return o.transpose(0, 1).reshape(t, HIDDEN)


def norm(x):
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(DTYPE)


def positions(start, n):
    """Sinusoidal position embeddings of positions start…start+n-1: without
    them a long repetitive prompt averages out and greedy decoding repeats
    one token."""
    p = torch.arange(start, start + n, device=DEV, dtype=torch.float32)[:, None]
    ang = p / 10000 ** (torch.arange(0, HIDDEN, 2, device=DEV, dtype=torch.float32) / HIDDEN)
    return torch.stack((ang.sin(), ang.cos()), -1).flatten(1).to(DTYPE)


def forward(tokens, ids, start):
    """Runs tokens (positions start…) through the model, writing their K and
    V into blocks ids and attending over everything before them; returns the
    next token (greedy)."""
    n = start + len(tokens)
    bi, si = slots(ids, n)
    h = EMB[torch.tensor(tokens, device=DEV)] + positions(start, len(tokens))
    for layer in range(LAYERS):
        q, k, v = (norm(h) @ WQKV[layer]).split(HIDDEN, dim=1)
        KV[0, layer, bi[start:], si[start:]] = k
        KV[1, layer, bi[start:], si[start:]] = v
        ks, vs = KV[0, layer, bi, si], KV[1, layer, bi, si]
        h = h + attend(q, ks, vs, causal=start == 0) @ WO[layer]
    return int(torch.argmax((norm(h[-1]) @ HEAD).float()).item())


def prefill(toks, ids):
    """The whole prompt, in the order every path uses (all tokens but the
    last, then the last), so that a disaggregated answer and a local one run
    the same kernels on the same shapes and agree token for token."""
    if len(toks) > 1:
        forward(toks[:-1], ids, 0)
    return forward(toks[-1:], ids, len(toks) - 1)


def tokenize(prompt):
    if isinstance(prompt, list):
        prompt = prompt[0] if prompt else ""
    return list(str(prompt).encode())[:BLOCK * NUM_BLOCKS // 2] or [0]


# ---- the prefill engine's side: held KV and the side channel ----

holds = {}  # request id → (block ids, timer)


def hold(request_id, ids):
    def expire():
        if drop_hold(request_id):
            stats["held_expired"] += 1
            log(f"held KV of {request_id} expired after {ABORT_TIMEOUT:g} s: freed {len(ids)} blocks")
    t = threading.Timer(ABORT_TIMEOUT, expire)
    t.daemon = True
    with pool_lock:
        holds[request_id] = (ids, t)
    t.start()


def drop_hold(request_id):
    with pool_lock:
        h = holds.pop(request_id, None)
    if h is None:
        return False
    h[1].cancel()
    release(h[0])
    return True


def send_msg(sock, obj, payload=b""):
    b = json.dumps(obj).encode()
    sock.sendall(struct.pack("!II", len(b), len(payload)) + b + payload)


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        c = sock.recv(min(n - len(buf), 1 << 22))
        if not c:
            raise ConnectionError("the peer closed the side channel")
        buf += c
    return bytes(buf)


def recv_msg(sock):
    hl, pl = struct.unpack("!II", recv_exact(sock, 8))
    return json.loads(recv_exact(sock, hl)), recv_exact(sock, pl) if pl else b""


def ipc_meta():
    """The KV pool's CUDA IPC handle, JSON-safe (bytes as base64)."""
    meta = KV.untyped_storage()._share_cuda_()
    return [base64.b64encode(m).decode() if isinstance(m, bytes) else m for m in meta]


class SideChannel(socketserver.BaseRequestHandler):
    def handle(self):
        s = self.request
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while True:
            try:
                msg, _ = recv_msg(s)
            except (ConnectionError, struct.error):
                return
            op = msg.get("op")
            if op == "handshake":
                ans = {"ok": True, "engine_id": ENGINE_ID, "layout": list(KV.shape), "dtype": str(DTYPE), "block": BLOCK}
                if msg.get("transport") == "cuda_ipc" and CUDA:
                    try:
                        ans["ipc"] = ipc_meta()
                    except Exception as e:  # no CUDA IPC here (a sandbox): tcp
                        ans["ipc_error"] = f"{type(e).__name__}: {e}"
                send_msg(s, ans)
            elif op == "read":
                rid, ids = msg["request_id"], msg["block_ids"]
                with pool_lock:
                    h = holds.get(rid)
                if msg.get("engine_id") != ENGINE_ID:
                    send_msg(s, {"ok": False, "error": f"engine {msg.get('engine_id')} is not this engine ({ENGINE_ID}): it restarted"})
                elif h is None or h[0] != ids:
                    send_msg(s, {"ok": False, "error": f"no KV held for request {rid} (freed, expired or never prefilled here)"})
                elif msg.get("transport") == "cuda_ipc":
                    send_msg(s, {"ok": True})  # D reads the pool itself
                else:
                    data = KV[:, :, ids].contiguous().cpu()
                    send_msg(s, {"ok": True, "shape": list(data.shape)}, data.view(torch.uint8).numpy().tobytes())
            elif op == "done":
                freed = drop_hold(msg["request_id"])
                send_msg(s, {"ok": True, "freed": freed})
            else:
                send_msg(s, {"ok": False, "error": f"unknown op {op!r}"})


# ---- the decode engine's side: peers and pulls ----

class Peer:
    def __init__(self, host, port, engine_id):
        t0 = time.time()
        self.key = (host, port)
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.lock = threading.Lock()
        send_msg(self.sock, {"op": "handshake", "transport": TRANSPORT, "engine_id": engine_id})
        ans, _ = recv_msg(self.sock)
        self.engine_id, self.remote, self.transport = ans["engine_id"], None, "tcp"
        if ans["layout"][0:2] != list(KV.shape)[0:2] or ans["layout"][3:] != list(KV.shape)[3:] or ans["dtype"] != str(DTYPE):
            raise ValueError(f"peer KV layout {ans['layout']} {ans['dtype']} does not match this engine's {list(KV.shape)} {DTYPE}")
        if "ipc" in ans:
            meta = [base64.b64decode(m) if isinstance(m, str) else m for m in ans["ipc"]]
            storage = torch.UntypedStorage._new_shared_cuda(*meta)
            self.remote = torch.empty(0, dtype=DTYPE, device=DEV).set_(storage, 0, ans["layout"])
            self.transport = "cuda_ipc"
        elif TRANSPORT == "cuda_ipc":
            log(f"peer {host}:{port} gave no CUDA IPC handle ({ans.get('ipc_error', 'not on a GPU')}): pulling over tcp")
        self.seconds = time.time() - t0
        stats["handshakes"] += 1
        stats["handshake_seconds"] += self.seconds
        log(f"handshake with {host}:{port} (engine {self.engine_id[:8]}, {self.transport}) in {self.seconds:.3f} s")

    def call(self, msg):
        send_msg(self.sock, msg)
        return recv_msg(self.sock)

    def close(self):
        self.remote = None
        try:
            self.sock.close()
        except OSError:
            pass


peers = {}
peers_lock = threading.Lock()


def peer(host, port, engine_id):
    """The connected peer at host:port; a new handshake when there is none or
    the one there restarted (a new engine id)."""
    with peers_lock:
        p = peers.get((host, port))
        if p is not None and p.engine_id != engine_id:
            p.close()
            p = None
        fresh = p is None
        if fresh:
            p = Peer(host, port, engine_id)
            peers[(host, port)] = p
        return p, fresh


def forget(p):
    with peers_lock:
        if peers.get(p.key) is p:
            del peers[p.key]
    p.close()
    if CUDA:
        torch.cuda.empty_cache()


def pull(kvp, ids):
    """Pulls the prefill engine's blocks named by kv_transfer_params kvp into
    local blocks ids; returns (bytes, seconds, handshake seconds, transport)."""
    rids = kvp["remote_block_ids"][:len(ids)]
    p, fresh = peer(kvp["remote_host"], int(kvp["remote_port"]), kvp["remote_engine_id"])
    hs = p.seconds if fresh else 0.0
    t0 = time.time()
    try:
        with p.lock:
            ans, data = p.call({"op": "read", "request_id": kvp["remote_request_id"], "block_ids": kvp["remote_block_ids"],
                                "engine_id": kvp["remote_engine_id"], "transport": p.transport})
            if not ans.get("ok"):
                raise RuntimeError(ans.get("error", "the prefill engine refused the read"))
            dst = torch.tensor(ids, device=DEV)
            if p.transport == "cuda_ipc":
                KV[:, :, dst] = p.remote[:, :, torch.tensor(rids, device=DEV)]
            else:
                t = torch.frombuffer(bytearray(data), dtype=torch.uint8).view(KV.dtype).view(ans["shape"])
                KV[:, :, dst] = t[:, :, :len(ids)].to(DEV)
            if CUDA:
                torch.cuda.synchronize()
            secs = time.time() - t0
            p.call({"op": "done", "request_id": kvp["remote_request_id"]})
    except (OSError, ConnectionError, struct.error, RuntimeError) as e:
        forget(p)
        raise RuntimeError(f"pull from {kvp['remote_host']}:{kvp['remote_port']}: {e}") from e
    n = len(ids) * BYTES_PER_BLOCK
    stats["pulls"] += 1
    stats["pull_bytes"] += n
    stats["pull_seconds"] += secs
    return n, secs, hs, p.transport


# ---- the API ----

def error(code, typ, msg):
    return code, {"error": {"message": msg, "type": typ, "param": None, "code": code}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send(self, code, body, ctype="application/json"):
        b = body.encode() if isinstance(body, str) else json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)

    def chunk(self, obj):
        b = (f"data: {obj}\n\n" if isinstance(obj, str) else f"data: {json.dumps(obj)}\n\n").encode()
        self.wfile.write(f"{len(b):x}\r\n".encode() + b + b"\r\n")
        self.wfile.flush()

    def do_GET(self):
        if self.path == "/health":
            self.send(200, "")
        elif self.path == "/v1/models":
            self.send(200, {"object": "list", "data": [{"id": SERVED, "object": "model", "owned_by": "torch-pd", "max_model_len": BLOCK * NUM_BLOCKS // 2}]})
        elif self.path == "/metrics":
            lab = f'{{model_name="{SERVED}"}}'
            m = "".join(f"{k}{lab} {v}\n" for k, v in [
                ("vllm:num_requests_running", stats["running"]), ("vllm:num_requests_waiting", stats["waiting"]),
                ("vllm:kv_cache_usage_perc", round(usage(), 6)), ("vllm:prompt_tokens_total", stats["prompt_tokens"]),
                ("vllm:generation_tokens_total", stats["generation_tokens"]),
                ("torchpd:kv_pull_bytes_total", stats["pull_bytes"]), ("torchpd:kv_pull_seconds_total", round(stats["pull_seconds"], 6)),
                ("torchpd:kv_pulls_total", stats["pulls"]), ("torchpd:kv_pull_failures_total", stats["pull_failures"]),
                ("torchpd:handshakes_total", stats["handshakes"]), ("torchpd:kv_held_blocks", sum(len(h[0]) for h in list(holds.values()))),
                ("torchpd:kv_held_expired_total", stats["held_expired"])])
            self.send(200, m, "text/plain; version=0.0.4")
        else:
            self.send(*error(404, "NotFoundError", "Not Found"))

    def do_POST(self):
        if self.path != "/v1/completions":
            return self.send(*error(404, "NotFoundError", f"{self.path}: this example serves /v1/completions only"))
        try:
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
            if not isinstance(req, dict):
                raise ValueError("the body is not a JSON object")
            n = int(req.get("max_tokens") or 16)
            if not 1 <= n <= 4096:
                raise ValueError(f"max_tokens must be 1 to 4096, got {n}")
        except (ValueError, TypeError) as e:
            return self.send(*error(400, "BadRequestError", f"Invalid request: {e}"))
        if req.get("model") != SERVED:
            return self.send(*error(404, "NotFoundError", f"The model `{req.get('model')}` does not exist."))
        kvp = req.get("kv_transfer_params") or {}
        toks = tokenize(req.get("prompt", ""))
        rid = self.headers.get("X-Request-Id") or f"cmpl-{uuid.uuid4().hex}"
        stream = bool(req.get("stream"))
        try:
            ids = alloc(blocks_for(len(toks) + n))
        except MemoryError as e:
            return self.send(*error(503, "ServiceUnavailableError", str(e)))
        kept = False
        t0 = time.time()
        info = {"role": ROLE, "device": str(DEV)}
        stats["waiting"] += 1
        try:
            with compute_lock:
                stats["waiting"] -= 1
                stats["running"] += 1
                try:
                    if kvp.get("do_remote_decode"):
                        # The prefill half: compute the prompt, hold its blocks.
                        first = prefill(toks, ids)
                        if CUDA:
                            torch.cuda.synchronize()
                        pb = blocks_for(len(toks))
                        release(ids[pb:])
                        ids = ids[:pb]
                        hold(rid, ids)
                        kept = True
                        stats["prompt_tokens"] += len(toks)
                        stats["requests"] += 1
                        return self.send(200, {"id": rid, "object": "text_completion", "created": int(t0), "model": SERVED,
                                               "choices": [{"index": 0, "text": chr(first) if 32 <= first < 127 else "", "logprobs": None, "finish_reason": "length"}],
                                               "usage": {"prompt_tokens": len(toks), "completion_tokens": 1, "total_tokens": len(toks) + 1},
                                               "kv_transfer_params": {"do_remote_prefill": True, "do_remote_decode": False,
                                                                      "remote_engine_id": ENGINE_ID, "remote_block_ids": ids,
                                                                      "remote_request_id": rid, "remote_host": SIDE_HOST,
                                                                      "remote_port": SIDE_PORT, "tp_size": 1}})
                    start = 0
                    if kvp.get("do_remote_prefill"):
                        # The decode half: pull the prompt's KV but the last
                        # token's, which this engine computes (as vLLM does).
                        have = len(toks) - 1
                        try:
                            if have > 0:
                                b, secs, hs, tr = pull(kvp, ids[:blocks_for(have)])
                                info["kv_transfer"] = {"bytes": b, "seconds": round(secs, 6), "gbps": round(b / secs / 1e9, 3) if secs else None,
                                                       "handshake_seconds": round(hs, 6), "transport": tr, "tokens": have}
                            start = max(have, 0)
                        except (RuntimeError, ValueError, KeyError, TypeError) as e:
                            stats["pull_failures"] += 1
                            log(f"{rid}: {e}")
                            if POLICY == "fail":
                                return self.send(*error(500, "InternalServerError",
                                                        f"Failed to load KV cache from the remote prefill engine (kv_load_failure_policy=fail): {e}"))
                            info["kv_transfer"] = {"recomputed": True, "error": str(e)}
                    tok = forward(toks[start:], ids, start) if start else prefill(toks, ids)
                    # A digest of the prompt's KV as this engine now holds
                    # it: equal for a pulled and a locally computed prompt
                    # only if the pull moved the right bytes to the right slots.
                    bi, si = slots(ids, len(toks))
                    info["kv_digest"] = float(KV[:, :, bi, si].double().abs().sum().item())
                    stats["prompt_tokens"] += len(toks) - start
                    out, pos = [], len(toks)
                    if stream:
                        self.send_response(200)
                        self.send_header("Content-Type", "text/event-stream")
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                    ttft = None
                    for i in range(n):
                        out.append(tok)
                        if ttft is None:
                            ttft = time.time() - t0
                        if stream:
                            self.chunk({"id": rid, "object": "text_completion", "created": int(t0), "model": SERVED,
                                        "choices": [{"index": 0, "text": chr(tok) if 32 <= tok < 127 else " ", "logprobs": None, "finish_reason": None}]})
                        if i + 1 < n:
                            tok = forward([tok], ids, pos)
                            pos += 1
                    stats["generation_tokens"] += n
                    stats["requests"] += 1
                    info["ttft_seconds"] = round(ttft, 6)
                    info["seconds"] = round(time.time() - t0, 6)
                    if stream:
                        self.chunk({"id": rid, "object": "text_completion", "created": int(t0), "model": SERVED,
                                    "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "length"}],
                                    "usage": {"prompt_tokens": len(toks), "completion_tokens": n, "total_tokens": len(toks) + n}, "shoal_example": info})
                        self.chunk("[DONE]")
                        self.wfile.write(b"0\r\n\r\n")
                        return
                    return self.send(200, {"id": rid, "object": "text_completion", "created": int(t0), "model": SERVED,
                                           "choices": [{"index": 0, "text": "".join(chr(t) if 32 <= t < 127 else " " for t in out), "logprobs": None, "finish_reason": "length"}],
                                           "usage": {"prompt_tokens": len(toks), "completion_tokens": n, "total_tokens": len(toks) + n},
                                           "token_ids": out, "shoal_example": info})
                finally:
                    stats["running"] -= 1
        except (BrokenPipeError, ConnectionResetError):
            log(f"{rid}: the client went away")
        finally:
            if not kept:
                release(ids)


class Side(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


server = ThreadingHTTPServer((HOST, PORT), Handler)
server.daemon_threads = True
if ROLE == "prefill":
    side = Side((SIDE_HOST, SIDE_PORT), SideChannel)
    threading.Thread(target=side.serve_forever, daemon=True).start()
    log(f"side channel on {SIDE_HOST}:{SIDE_PORT}")


def stop(*_):
    log("SIGTERM: stopping")
    threading.Thread(target=server.shutdown, daemon=True).start()


signal.signal(signal.SIGTERM, stop)
log(f"serving http://{HOST}:{PORT} as {SERVED} ({ROLE})")
server.serve_forever()
