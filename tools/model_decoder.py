"""An independent reader of prism model files, written from docs/MODEL_FORMAT.md alone (numpy
only): it decodes the file, derives every masked layer's effective weights, runs the generator
on the CPU and, when asked, compares with what prism wrote.

    python3 tools/model_decoder.py MODEL.prism [--safetensors W.safetensors] [--raw IMAGES.npy]
                                   [--first I] [--count N]

--safetensors: the file of `prism export --safetensors` (the effective weights must agree bit
for bit). --raw: the file of `prism sample --raw` with --latents I -n N (the images must agree
to within 1e-4). Exits 1 on any disagreement, 2 on a malformed file. tests/model_decoder.rs
runs it.
"""
import argparse, json, struct, sys, zlib

import numpy as np

np.seterr(over="ignore")  # the hash's multiplications wrap, as intended
U32 = np.uint32
MASK32 = 0xFFFFFFFF
EPS = np.float32(1e-5)


class Malformed(Exception):
    pass


# ---- the hash (MODEL_FORMAT.md, "Weights") ------------------------------------------------

def mix32(x):
    x = np.asarray(x, dtype=U32)
    x = x ^ (x >> U32(16))
    x = x * U32(0x7FEB352D)
    x = x ^ (x >> U32(15))
    x = x * U32(0x846CA68B)
    x = x ^ (x >> U32(16))
    return x


def key(k, ident):
    return U32(mix32(U32(k) ^ mix32(U32(ident))))


def key_path(seed, ids):
    k = U32(mix32(U32(seed)))
    for i in ids:
        k = key(k, i)
    return k


def u32_at(k, ctr):
    return mix32((np.asarray(ctr, dtype=U32) * U32(0x9E3779B9)) ^ U32(k))


# ---- the file (MODEL_FORMAT.md, "Layout") -------------------------------------------------

class Reader:
    def __init__(self, b):
        self.b, self.at = b, 0

    def take(self, n):
        if n > len(self.b) - self.at:
            raise Malformed(f"truncated: {n} bytes wanted at offset {self.at}")
        out = self.b[self.at:self.at + n]
        self.at += n
        return out

    def u8(self):
        return self.take(1)[0]

    def u16(self):
        return struct.unpack("<H", self.take(2))[0]

    def u32(self):
        return struct.unpack("<I", self.take(4))[0]


def range_decode(payload, n):
    """The coded mask record: k ones, then constriction's queue range coder (64-bit state,
    32-bit words, 24-bit probabilities) with symbol 0 in the lower interval."""
    if len(payload) < 4 or len(payload) % 4:
        raise Malformed("coded payload is not whole words")
    k = struct.unpack("<I", payload[:4])[0]
    if k > n:
        raise Malformed("more ones than weights")
    if k in (0, n):
        if len(payload) != 4:
            raise Malformed("a constant mask carries no words")
        return np.full(n, 1 if k == n else 0, dtype=np.uint8)
    words = list(struct.unpack(f"<{len(payload) // 4 - 1}I", payload[4:]))
    total = 1 << 24
    p1 = min(max((k * total + n // 2) // n, 1), total - 1)
    p0 = total - p1
    m64 = (1 << 64) - 1
    lower, rng = 0, m64
    point, read = 0, 0
    while read < 2 and read < len(words):
        point = (point << 32) | words[read]
        read += 1
    if read == 1:
        point <<= 32
    bits = np.zeros(n, dtype=np.uint8)
    for i in range(n):
        scale = rng >> 24
        q = ((point - lower) & m64) // scale
        if q >= total:
            raise Malformed("coded payload does not decode")
        if q < p0:
            rng = scale * p0
        else:
            bits[i] = 1
            lower = (lower + scale * p0) & m64
            rng = scale * p1
        if rng < (1 << 32):
            lower = (lower << 32) & m64
            rng <<= 32
            point = (point << 32) & m64
            if read < len(words):
                point |= words[read]
                read += 1
    if int(bits.sum()) != k:
        raise Malformed("coded payload does not decode to its count of ones")
    return bits


def read_model(path):
    b = open(path, "rb").read()
    if len(b) < 20 or b[:8] != b"PRISMMDL":
        raise Malformed("not a prism model file")
    if zlib.crc32(b[:-4]) != struct.unpack("<I", b[-4:])[0]:
        raise Malformed("checksum")
    r = Reader(b[:-4])
    r.take(8)
    version, reserved = r.u16(), r.u16()
    if version not in (1, 2) or reserved != 0:
        raise Malformed(f"version {version}, reserved {reserved}")
    header = json.loads(r.take(r.u32()).decode("utf-8"))
    masks = []
    for i, n in enumerate(header["layers"]):
        enc, w, length = r.u8(), r.u32(), r.u32()
        payload = r.take(length)
        if w != n:
            raise Malformed(f"layer {i}: {w} weights, header says {n}")
        if enc == 0:
            if length != (n + 7) // 8:
                raise Malformed(f"layer {i}: {length} bytes of bits")
            bits = np.unpackbits(np.frombuffer(payload, np.uint8), bitorder="little")
            if bits[n:].any():
                raise Malformed(f"layer {i}: bits past the last weight")
            bits = bits[:n]
        elif enc == 2:
            bits = range_decode(payload, n)
        else:
            raise Malformed(f"layer {i}: encoding {enc}")
        masks.append(bits)
    stats = None
    flag = r.u8() if version >= 2 else 0
    if flag not in (0, 1):
        raise Malformed(f"statistics flag {flag}")
    if flag == 1:
        stats = []
        for _ in range(r.u32()):
            c = r.u32()
            mean = np.frombuffer(r.take(4 * c), "<f4").copy()
            var = np.frombuffer(r.take(4 * c), "<f4").copy()
            stats.append((mean, var))
    if r.at != len(r.b):
        raise Malformed("bytes after the last section")
    return header, masks, stats


# ---- the network (MODEL_FORMAT.md, "Weights", "BatchNorm", "Latents and images") -----------

def sizes_through(layers, shape, visit):
    """Walks a layer list in forward order with per-sample shapes (c, h, w); visit(layer, shape)
    sees every layer, nested ones included (main before skip)."""
    for layer in layers:
        visit(layer, shape)
        kind, p = (layer, None) if isinstance(layer, str) else next(iter(layer.items()))
        if kind == "Residual":
            sizes_through(p["main"], shape, visit)
            shape = sizes_through(p["skip"], shape, visit)
        else:
            shape = out_shape(kind, p, shape)
    return shape


def out_shape(kind, p, s):
    c, h, w = s
    if kind == "Linear":
        return (p["outputs"], 1, 1)
    if kind == "Conv":
        return (p["cout"], (h + 2 * p["pad"] - p["k"]) // p["stride"] + 1,
                (w + 2 * p["pad"] - p["k"]) // p["stride"] + 1)
    if kind == "ConvT":
        return (p["cout"], (h - 1) * p["stride"] + p["k"] - 2 * p["pad"],
                (w - 1) * p["stride"] + p["k"] - 2 * p["pad"])
    if kind == "Upsample2x":
        return (c, 2 * h, 2 * w)
    if kind == "Reshape":
        return (p["c"], p["h"], p["w"])
    return s


def effective_weights(header, masks):
    arch = header["architecture"]
    infos = []

    def visit(layer, s):
        if isinstance(layer, str):
            return
        kind, p = next(iter(layer.items()))
        c, h, w = s
        if kind == "Linear":
            infos.append((kind, (p["outputs"], c * h * w), c * h * w))
        elif kind == "Conv":
            infos.append((kind, (p["cout"], c, p["k"], p["k"]), c * p["k"] ** 2))
        elif kind == "ConvT":
            infos.append((kind, (c, p["cout"], p["k"], p["k"]), p["cout"] * p["k"] ** 2))

    sizes_through(arch["layers"], (arch["latent"], 1, 1), visit)
    out = []
    for l, ((kind, dims, fan_in), bits) in enumerate(zip(infos, masks)):
        n = int(np.prod(dims))
        if n != len(bits):
            raise Malformed(f"layer {l}: {len(bits)} mask bits for {n} weights")
        k = key_path(header["seed"], [0x57454947, l])
        i = np.arange(n, dtype=np.uint64).astype(U32)
        std = np.sqrt(2.0 / fan_in)
        if header["init"] == "SignedConstant":
            scale = np.float32(std)
            sign = (u32_at(k, i >> U32(5)) >> (i & U32(31))) & U32(1)
            w = np.where(sign == 1, scale, -scale).astype(np.float32)
        else:
            scale = np.float32(std / 53509.56681903645)
            s = np.zeros(n, dtype=np.int64)
            for j in range(4):
                h = u32_at(k, i * U32(4) + U32(j)).astype(np.int64)
                s += (h & 0xFFFF) + (h >> 16)
            w = (s - 262140).astype(np.float32) * scale
        out.append((kind, dims, np.where(bits == 1, w, np.float32(0)).astype(np.float32)))
    return out


def latents(seed, latent, first, count, client=0xFFFFFFFF):
    base = key(key_path(seed, [0x4C415445]), client)
    z = np.zeros((count, latent), dtype=np.float32)
    j = np.arange(latent, dtype=U32)
    pair = j >> U32(1)
    for m in range(count):
        k = key(base, (first + m) & MASK32)
        u1 = ((u32_at(k, U32(2) * pair) >> U32(8)).astype(np.float32) + np.float32(0.5)) \
            * np.float32(5.9604645e-8)
        u2 = (u32_at(k, U32(2) * pair + U32(1)) >> U32(8)).astype(np.float32) \
            * np.float32(5.9604645e-8)
        r = np.sqrt(np.float32(-2.0) * np.log(u1))
        theta = np.float32(2 * np.pi) * u2
        z[m] = np.where(j & U32(1), r * np.sin(theta), r * np.cos(theta))
    return z


def conv(x, w, stride, pad):
    n, c, h, wd = x.shape
    cout, _, k, _ = w.shape
    oh, ow = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    y = np.zeros((n, cout, oh, ow))
    for ky in range(k):
        for kx in range(k):
            patch = xp[:, :, ky:ky + stride * oh:stride, kx:kx + stride * ow:stride]
            y += np.einsum("nchw,oc->nohw", patch, w[:, :, ky, kx])
    return y


def conv_t(x, w, stride, pad):
    n, c, h, wd = x.shape
    _, cout, k, _ = w.shape
    full = np.zeros((n, cout, (h - 1) * stride + k, (wd - 1) * stride + k))
    for ky in range(k):
        for kx in range(k):
            full[:, :, ky:ky + stride * h:stride, kx:kx + stride * wd:stride] += \
                np.einsum("nchw,co->nohw", x, w[:, :, ky, kx])
    oh, ow = full.shape[2] - 2 * pad, full.shape[3] - 2 * pad
    return full[:, :, pad:pad + oh, pad:pad + ow]


def run(layers, x, weights, coefs):
    for layer in layers:
        kind, p = (layer, None) if isinstance(layer, str) else next(iter(layer.items()))
        if kind == "Linear":
            _, dims, w = weights.pop(0)
            x = (x.reshape(len(x), -1) @ w.reshape(dims).astype(np.float64).T)[:, :, None, None]
        elif kind == "Conv":
            _, dims, w = weights.pop(0)
            x = conv(x, w.reshape(dims).astype(np.float64), p["stride"], p["pad"])
        elif kind == "ConvT":
            _, dims, w = weights.pop(0)
            x = conv_t(x, w.reshape(dims).astype(np.float64), p["stride"], p["pad"])
        elif kind == "BatchNorm":
            a, b = coefs.pop(0)
            x = x * a[None, :, None, None] + b[None, :, None, None]
        elif kind == "Relu":
            x = np.maximum(x, 0)
        elif kind == "Tanh":
            x = np.tanh(x)
        elif kind == "Upsample2x":
            x = x.repeat(2, axis=2).repeat(2, axis=3)
        elif kind == "Blur":
            xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
            h, w = x.shape[2], x.shape[3]
            t = [1.0, 2.0, 1.0]
            x = sum(t[dy] * t[dx] * xp[:, :, dy:dy + h, dx:dx + w]
                    for dy in range(3) for dx in range(3)) / 16.0
        elif kind == "Reshape":
            x = x.reshape(len(x), p["c"], p["h"], p["w"])
        elif kind == "Residual":
            x = run(p["main"], x, weights, coefs) + run(p["skip"], x, weights, coefs)
        else:
            raise Malformed(f"layer kind {kind} is not a generator's")
    return x


def generate(header, weights, stats, first, count):
    if stats is None:
        raise Malformed("the file has no population statistics (calibrate it with prism export)")
    coefs = []
    for mean, var in stats:
        a = 1.0 / np.sqrt(var.astype(np.float64) + np.float64(EPS))
        coefs.append((a.astype(np.float32).astype(np.float64),
                      (-mean.astype(np.float64) * a).astype(np.float32).astype(np.float64)))
    arch = header["architecture"]
    z = latents(header["seed"], arch["latent"], first, count).astype(np.float64)
    return run(arch["layers"], z[:, :, None, None], list(weights), coefs).astype(np.float32)


def read_safetensors(path):
    b = open(path, "rb").read()
    n = struct.unpack("<Q", b[:8])[0]
    meta = json.loads(b[8:8 + n])
    data = b[8 + n:]
    out = {}
    for name, t in meta.items():
        if name == "__metadata__":
            continue
        s, e = t["data_offsets"]
        out[name] = (t["shape"], np.frombuffer(data[s:e], "<f4"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--safetensors")
    ap.add_argument("--raw")
    ap.add_argument("--first", type=int, default=0)
    ap.add_argument("--count", type=int, default=16)
    a = ap.parse_args()
    try:
        header, masks, stats = read_model(a.model)
        weights = effective_weights(header, masks)
    except Malformed as e:
        print(f"{a.model}: {e}", file=sys.stderr)
        return 2
    ok = True
    names = {"Linear": "linear", "Conv": "conv", "ConvT": "conv_transpose"}
    print(f"{a.model}: {header['architecture']['name']}, {len(weights)} masked layers, "
          f"{sum(len(w) for _, _, w in weights)} weights, "
          f"{'population statistics' if stats else 'no statistics'}")
    if a.safetensors:
        st = read_safetensors(a.safetensors)
        for l, (kind, dims, w) in enumerate(weights):
            name = f"masked.{l}.{names[kind]}.weight"
            shape, theirs = st[name]
            same = tuple(shape) == tuple(dims) and np.array_equal(
                theirs.view(np.uint32), w.view(np.uint32))
            print(f"  {name} {list(dims)}: {'bit-identical' if same else 'DIFFERENT'}")
            ok &= same
    if a.raw:
        try:
            mine = generate(header, weights, stats, a.first, a.count)
        except Malformed as e:
            print(f"{a.model}: {e}", file=sys.stderr)
            return 2
        theirs = np.load(a.raw)
        worst = float(np.abs(theirs - mine).max()) if theirs.shape == mine.shape else np.inf
        print(f"  images {a.first}..{a.first + a.count - 1} {list(mine.shape)}: "
              f"largest difference {worst:.2e}")
        ok &= worst <= 1e-4
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
