//% if half
enable f16;
//% endif
// Masked 2-D convolution as an implicit GEMM, weights regenerated in the kernel (weights.wgsl),
// any kernel size, stride and padding. Layouts: x [batch, cin, h, w], y [batch, cout, oh, ow],
// weights [cout, cin, kh, kw] (PyTorch's). Entry points:
//   forward      y = conv(x, w * m)        M = batch*oh*ow, N = cout, K = cin*kh*kw
//   grad_input   dx = conv^T(dy, w * m)    M = batch*h*w,   N = cin,  K = cout*kh*kw
//                (grad_input_strided for stride > 1: rows by residue class, K = the class's taps)
//   grad_score   partial sums of dL/dw_eff = sum over (b, oy, ox) of dy x, split along K
//                into `splits` slices        M = cout,        N = cin*kh*kw
//   reduce_score sums the slices and applies the chain rule w * f(p) (as in masked_matmul)
// A transposed convolution is the same three products with roles exchanged (src/kernels/conv.rs).
//
// Tiling and row sharing as in masked_matmul.wgsl (octet.wgsl). The K index is the same for
// every lane, so its decomposition into (channel, ky, kx) advances incrementally and costs no
// divisions; each lane decomposes its own rows or columns once, before the loop.
//
// Narrow forms (`*_narrow`) serve layers with at most 4 channels on the N side (an image's
// output conv, an encoder's input conv), where an octet's 32 columns would be mostly idle: a lane
// owns one row and all (<= 4) columns, and the weights, which then depend only on values shared
// by all lanes, are generated once per subgroup or warp.
//% include "common.wgsl"
//% include "weights.wgsl"
//% include "octet.wgsl"
//% import "octet.wgsl" as octet

const R: u32 = {{ rows }}u;

struct Params {
    g: WeightGen,
    batch: u32,
    cin: u32,
    cout: u32,
    tiles_n: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    stride: u32,
    pad: u32,
    tiles_total: u32,  // tiles of one K slice
    estimator: u32,
    om: u32,
    on: u32,
    splits: u32,       // grad_score: number of K slices
    k_chunk: u32,      // grad_score: K indices per slice
    _pad0: u32,
    _pad1: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
@group(0) @binding(4) var<storage, read> dy: array<f32>;
@group(0) @binding(5) var<storage, read_write> dx: array<f32>;
@group(0) @binding(10) var<storage, read> scores: array<f32>;
@group(0) @binding(11) var<storage, read_write> grad: array<f32>;
@group(0) @binding(12) var<storage, read_write> partial: array<f32>;
@group(0) @binding(13) var<storage, read> partial_in: array<f32>;

// A position (channel, ky, kx) of the K index, advanced one step at a time.
struct KPos {
    c: u32,
    ky: u32,
    kx: u32,
}

fn kpos_next(k: KPos) -> KPos {
    var n = k;
    n.kx += 1u;
    if (n.kx == p.kw) {
        n.kx = 0u;
        n.ky += 1u;
        if (n.ky == p.kh) {
            n.ky = 0u;
            n.c += 1u;
        }
    }
    return n;
}

// forward: x at output position (row) and K position, zero in the padding.
// Row info: (offset of image b in x, oy * stride - pad, ox * stride - pad).
fn fwd_row(m: u32) -> vec3<i32> {
    let mm = min(m, p.batch * p.oh * p.ow - 1u);
    let b = mm / (p.oh * p.ow);
    let r = mm % (p.oh * p.ow);
    let oy = r / p.ow;
    let ox = r % p.ow;
    return vec3<i32>(i32(b * p.cin * p.h * p.w), i32(oy * p.stride) - i32(p.pad), i32(ox * p.stride) - i32(p.pad));
}

fn fwd_gather(ri: vec3<i32>, k: KPos) -> f32 {
    let iy = ri.y + i32(k.ky);
    let ix = ri.z + i32(k.kx);
    if (iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) {
        return 0.0;
    }
    return x[u32(ri.x) + k.c * p.h * p.w + u32(iy) * p.w + u32(ix)];
}

fn fwd_gather4(ri: vec3<i32>, k0: KPos, k1: KPos, k2: KPos, k3: KPos) -> vec4<f32> {
    return vec4<f32>(fwd_gather(ri, k0), fwd_gather(ri, k1), fwd_gather(ri, k2), fwd_gather(ri, k3));
}

@compute @workgroup_size(64)
fn forward({{ octet.entry_args() }}) {
    let tile = linear_workgroup(wid, nwg);
    if (tile >= p.tiles_total) {
        return;
    }
{{ octet.lane_setup() }}
    let m = p.batch * p.oh * p.ow;
    let n = p.cout;
    let k = p.cin * p.kh * p.kw;
    let row0 = (tile / p.tiles_n) * R * p.om + lane.om * R;
    let col0 = (tile % p.tiles_n) * 32u * p.on + lane.on * 32u + lane.lane8 * 4u;
    let c0 = min(col0, n - 1u);
    let c1 = min(col0 + 1u, n - 1u);
    let c2 = min(col0 + 2u, n - 1u);
    let c3 = min(col0 + 3u, n - 1u);
    let mkey = step_mask_key(p.g);
//% if row_share == "direct"
    var row_info: array<vec3<i32>, {{ rows }}>;
    for (var r = 0u; r < R; r++) {
        row_info[r] = fwd_row(row0 + r);
    }
//% else
//% for j in range(rows // 8)
    let ri{{ j }} = fwd_row(row0 + lane.lane8 + {{ 8 * j }}u);
//% endfor
//% endif
//% for r in range(rows)
    var acc{{ r }} = vec4<f32>(0.0);
//% endfor
    var kp = KPos(0u, 0u, 0u);
//% if aligned
    var sw0 = 0u;
    var sw1 = 0u;
    var sw2 = 0u;
    var sw3 = 0u;
    for (var i = 0u; i < k; i += 4u) {
        let k0 = kp;
        let k1 = kpos_next(k0);
        let k2 = kpos_next(k1);
        let k3 = kpos_next(k2);
        kp = kpos_next(k3);
//% if row_share != "direct"
//% for j in range(rows // 8)
        let a{{ j }} = fwd_gather4(ri{{ j }}, k0, k1, k2, k3);
//% endfor
//% endif
//% if source != "dense"
        if (((c0 * k + i) & 31u) == 0u || i == 0u) { sw0 = sign_word(p.g, c0 * k + i); }
        if (((c1 * k + i) & 31u) == 0u || i == 0u) { sw1 = sign_word(p.g, c1 * k + i); }
        if (((c2 * k + i) & 31u) == 0u || i == 0u) { sw2 = sign_word(p.g, c2 * k + i); }
        if (((c3 * k + i) & 31u) == 0u || i == 0u) { sw3 = sign_word(p.g, c3 * k + i); }
//% endif
        let w0 = weff4_word(p.g, c0 * k + i, mkey, sw0);
        let w1 = weff4_word(p.g, c1 * k + i, mkey, sw1);
        let w2 = weff4_word(p.g, c2 * k + i, mkey, sw2);
        let w3 = weff4_word(p.g, c3 * k + i, mkey, sw3);
//% if half
        let h0 = vec4<f16>(w0);
        let h1 = vec4<f16>(w1);
        let h2 = vec4<f16>(w2);
        let h3 = vec4<f16>(w3);
//% endif
//% for r in range(rows)
        {
//% if row_share == "direct"
            let xr = fwd_gather4(row_info[{{ r }}], k0, k1, k2, k3);
//% else
            let xr = {{ octet.share("a" ~ (r // 8), r % 8) | trim }};
//% endif
//% if half
            let xh = vec4<f16>(xr);
            acc{{ r }} += vec4<f32>(vec4<f16>(dot(xh, h0), dot(xh, h1), dot(xh, h2), dot(xh, h3)));
//% else
            acc{{ r }} += vec4<f32>(dot(xr, w0), dot(xr, w1), dot(xr, w2), dot(xr, w3));
//% endif
        }
//% endfor
    }
//% else
    for (var i = 0u; i < k; i++) {
//% if row_share != "direct"
//% for j in range(rows // 8)
        let a{{ j }} = fwd_gather(ri{{ j }}, kp);
//% endfor
//% endif
        let wv = vec4<f32>(weff1(p.g, c0 * k + i, mkey), weff1(p.g, c1 * k + i, mkey),
                           weff1(p.g, c2 * k + i, mkey), weff1(p.g, c3 * k + i, mkey));
//% for r in range(rows)
        {
//% if row_share == "direct"
            let xr = fwd_gather(row_info[{{ r }}], kp);
//% else
            let xr = {{ octet.share("a" ~ (r // 8), r % 8) | trim }};
//% endif
//% if half
            acc{{ r }} += vec4<f32>(f16(xr) * vec4<f16>(wv));
//% else
            acc{{ r }} += xr * wv;
//% endif
        }
//% endfor
        kp = kpos_next(kp);
    }
//% endif
    // Store: row m = (b, oy, ox), column co -> y[b, co, oy, ox].
    let ohw = p.oh * p.ow;
//% for r in range(rows)
    if (row0 + {{ r }}u < m) {
        let mm = row0 + {{ r }}u;
        let base = (mm / ohw) * n * ohw + mm % ohw;
        for (var q = 0u; q < 4u; q++) {
            if (col0 + q < n) {
                y[base + (col0 + q) * ohw] = acc{{ r }}[q];
            }
        }
    }
//% endfor
}

// grad_input: row m = (b, iy, ix) of dx; K = (co, ky, kx). Row info: (offset of image b in dy,
// iy + pad, ix + pad); dy contributes where (iy + pad - ky) is a multiple of the stride.
fn bwd_row(m: u32) -> vec3<i32> {
    let mm = min(m, p.batch * p.h * p.w - 1u);
    let b = mm / (p.h * p.w);
    let r = mm % (p.h * p.w);
    let iy = r / p.w;
    let ix = r % p.w;
    return vec3<i32>(i32(b * p.cout * p.oh * p.ow), i32(iy + p.pad), i32(ix + p.pad));
}

fn bwd_gather(ri: vec3<i32>, k: KPos) -> f32 {
    let ty = ri.y - i32(k.ky);
    let tx = ri.z - i32(k.kx);
//% if unit_stride
    // Stride 1 (every convolution of the paper): no per-element division.
    if (ty < 0 || tx < 0) {
        return 0.0;
    }
    let oy = ty;
    let ox = tx;
//% else
    let s = i32(p.stride);
    if (ty < 0 || tx < 0 || ty % s != 0 || tx % s != 0) {
        return 0.0;
    }
    let oy = ty / s;
    let ox = tx / s;
//% endif
    if (oy >= i32(p.oh) || ox >= i32(p.ow)) {
        return 0.0;
    }
    return dy[u32(ri.x) + k.c * p.oh * p.ow + u32(oy) * p.ow + u32(ox)];
}

@compute @workgroup_size(64)
fn grad_input({{ octet.entry_args() }}) {
    let tile = linear_workgroup(wid, nwg);
    if (tile >= p.tiles_total) {
        return;
    }
{{ octet.lane_setup() }}
    let m = p.batch * p.h * p.w;
    let n = p.cin;
    let khw = p.kh * p.kw;
    let k = p.cout * khw;
    let row0 = (tile / p.tiles_n) * R * p.om + lane.om * R;
    let col0 = (tile % p.tiles_n) * 32u * p.on + lane.on * 32u + lane.lane8 * 4u;
    let c0 = min(col0, n - 1u);
    let c1 = min(col0 + 1u, n - 1u);
    let c2 = min(col0 + 2u, n - 1u);
    let c3 = min(col0 + 3u, n - 1u);
    let mkey = step_mask_key(p.g);
//% if row_share == "direct"
    var row_info: array<vec3<i32>, {{ rows }}>;
    for (var r = 0u; r < R; r++) {
        row_info[r] = bwd_row(row0 + r);
    }
//% else
//% for j in range(rows // 8)
    let ri{{ j }} = bwd_row(row0 + lane.lane8 + {{ 8 * j }}u);
//% endfor
//% endif
//% for r in range(rows)
    var acc{{ r }} = vec4<f32>(0.0);
//% endfor
    var kp = KPos(0u, 0u, 0u);
    for (var i = 0u; i < k; i++) {
//% if row_share != "direct"
//% for j in range(rows // 8)
        let a{{ j }} = bwd_gather(ri{{ j }}, kp);
//% endfor
//% endif
        // Weight [co, ci, ky, kx] for the lane's four ci.
        let wi = kp.c * n * khw + kp.ky * p.kw + kp.kx;
        let wv = vec4<f32>(weff1(p.g, wi + c0 * khw, mkey), weff1(p.g, wi + c1 * khw, mkey),
                           weff1(p.g, wi + c2 * khw, mkey), weff1(p.g, wi + c3 * khw, mkey));
//% for r in range(rows)
        {
//% if row_share == "direct"
            let d = bwd_gather(row_info[{{ r }}], kp);
//% else
            let d = {{ octet.share("a" ~ (r // 8), r % 8) | trim }};
//% endif
//% if half
            acc{{ r }} += vec4<f32>(f16(d) * vec4<f16>(wv));
//% else
            acc{{ r }} += d * wv;
//% endif
        }
//% endfor
        kp = kpos_next(kp);
    }
    let hw = p.h * p.w;
//% for r in range(rows)
    if (row0 + {{ r }}u < m) {
        let mm = row0 + {{ r }}u;
        let base = (mm / hw) * n * hw + mm % hw;
        for (var q = 0u; q < 4u; q++) {
            if (col0 + q < n) {
                dx[base + (col0 + q) * hw] = acc{{ r }}[q];
            }
        }
    }
//% endfor
}

// grad_input with stride > 1, for any cin: the rows (input positions) ordered by residue class
// as in grad_input_strided_narrow, each class padded to whole tiles (R * om rows), so that every
// row of a tile meets the same taps and the K loop runs over the class's taps only: a quarter of
// grad_input's K for stride 2, with no per-element division or skipped taps in the loop.
// Row m (class-ordered): class m / per_class, then (b, qy, qx) with (iy, ix) = (py + s qy,
// px + s qx). Row info: (offset of image b in dy, oy0, ox0), oy0 = -big for padding rows.
fn strided_class_row(m: u32, per_class: u32, qh: u32, qw: u32, py: u32, px: u32, ky0: u32,
                     kx0: u32) -> vec3<i32> {
    let s = p.stride;
    let r = m % per_class;
    let b = r / (qh * qw);
    let iy = py + s * ((r % (qh * qw)) / qw);
    let ix = px + s * (r % qw);
    if (b >= p.batch || iy >= p.h || ix >= p.w) {
        return vec3<i32>(0, -1000000, -1000000);
    }
    return vec3<i32>(i32(b * p.cout * p.oh * p.ow), i32(iy + p.pad - ky0) / i32(s),
                     i32(ix + p.pad - kx0) / i32(s));
}

fn strided_class_gather(ri: vec3<i32>, t: TapPos) -> f32 {
    return strided_gather(t, u32(ri.x), ri.y, ri.z);
}

@compute @workgroup_size(64)
fn grad_input_strided({{ octet.entry_args() }}) {
    let tile = linear_workgroup(wid, nwg);
    if (tile >= p.tiles_total) {
        return;
    }
{{ octet.lane_setup() }}
    let s = p.stride;
    let qh = (p.h + s - 1u) / s;
    let qw = (p.w + s - 1u) / s;
    let tile_m = R * p.om;
    let per_class = ((p.batch * qh * qw + tile_m - 1u) / tile_m) * tile_m;
    let n = p.cin;
    let khw = p.kh * p.kw;
    let tile_row0 = (tile / p.tiles_n) * tile_m;
    let row0 = tile_row0 + lane.om * R;
    // Every row of the tile is of one class (tile_m divides per_class).
    let residue = min(tile_row0 / per_class, s * s - 1u);
    let py = residue / s;
    let px = residue % s;
    let ky0 = (py + p.pad) % s;
    let kx0 = (px + p.pad) % s;
    let nty = select(0u, (p.kh - ky0 + s - 1u) / s, ky0 < p.kh);
    let ntx = select(0u, (p.kw - kx0 + s - 1u) / s, kx0 < p.kw);
    let k = p.cout * nty * ntx;
    let col0 = (tile % p.tiles_n) * 32u * p.on + lane.on * 32u + lane.lane8 * 4u;
    let c0 = min(col0, n - 1u);
    let c1 = min(col0 + 1u, n - 1u);
    let c2 = min(col0 + 2u, n - 1u);
    let c3 = min(col0 + 3u, n - 1u);
    let mkey = step_mask_key(p.g);
//% if row_share == "direct"
    var row_info: array<vec3<i32>, {{ rows }}>;
    for (var r = 0u; r < R; r++) {
        row_info[r] = strided_class_row(row0 + r, per_class, qh, qw, py, px, ky0, kx0);
    }
//% else
//% for j in range(rows // 8)
    let ri{{ j }} = strided_class_row(row0 + lane.lane8 + {{ 8 * j }}u, per_class, qh, qw, py, px, ky0, kx0);
//% endfor
//% endif
//% for r in range(rows)
    var acc{{ r }} = vec4<f32>(0.0);
//% endfor
    var tp = TapPos(0u, 0u, 0u);
    for (var i = 0u; i < k; i++) {
//% if row_share != "direct"
//% for j in range(rows // 8)
        let a{{ j }} = strided_class_gather(ri{{ j }}, tp);
//% endfor
//% endif
        // Weight [co, ci, ky0 + s jy, kx0 + s jx] for the lane's four ci.
        let wi = tp.co * n * khw + (ky0 + s * tp.jy) * p.kw + kx0 + s * tp.jx;
        let wv = vec4<f32>(weff1(p.g, wi + c0 * khw, mkey), weff1(p.g, wi + c1 * khw, mkey),
                           weff1(p.g, wi + c2 * khw, mkey), weff1(p.g, wi + c3 * khw, mkey));
//% for r in range(rows)
        {
//% if row_share == "direct"
            let d = strided_class_gather(row_info[{{ r }}], tp);
//% else
            let d = {{ octet.share("a" ~ (r // 8), r % 8) | trim }};
//% endif
//% if half
            acc{{ r }} += vec4<f32>(f16(d) * vec4<f16>(wv));
//% else
            acc{{ r }} += d * wv;
//% endif
        }
//% endfor
        tp = tap_next(tp, nty, ntx);
    }
    let hw = p.h * p.w;
//% for r in range(rows)
    {
        let r = (row0 + {{ r }}u) % per_class;
        let b = r / (qh * qw);
        let iy = py + s * ((r % (qh * qw)) / qw);
        let ix = px + s * (r % qw);
        if (row0 + {{ r }}u < per_class * s * s && b < p.batch && iy < p.h && ix < p.w) {
            let base = b * n * hw + iy * p.w + ix;
            for (var q = 0u; q < 4u; q++) {
                if (col0 + q < n) {
                    dx[base + (col0 + q) * hw] = acc{{ r }}[q];
                }
            }
        }
    }
//% endfor
}

// Narrow forms: the lanes generate a chunk of K steps' weights (or load the output gradients)
// together and share them: with subgroups, 8 steps at a time by broadcasts (lavapipe's workgroup
// memory is slow); without, 64 at a time through workgroup memory.
var<workgroup> chunk: array<vec4<f32>, 64>;

// a * w, in f16 for `half` (accumulated by the caller in f32).
fn mul(a: f32, w: vec4<f32>) -> vec4<f32> {
//% if half
    return vec4<f32>(f16(a) * vec4<f16>(w));
//% else
    return a * w;
//% endif
}

// Advances an output position (b, oy, ox) by one.
fn next_position(b: ptr<function, u32>, oy: ptr<function, u32>, ox: ptr<function, u32>) {
    *ox += 1u;
    if (*ox == p.ow) {
        *ox = 0u;
        *oy += 1u;
        if (*oy == p.oh) {
            *oy = 0u;
            *b += 1u;
        }
    }
}

// forward for cout <= 4: one lane per output position.
@compute @workgroup_size(64)
fn forward_narrow({{ octet.entry_args() }}) {
{{ octet.lane_setup() }}
    let m = linear_workgroup(wid, nwg) * 64u + li;
    let rows = p.batch * p.oh * p.ow;
    let n = p.cout;
    let k = p.cin * p.kh * p.kw;
    let ri = fwd_row(m);
    let mkey = step_mask_key(p.g);
    var acc = vec4<f32>(0.0);
    var kp = KPos(0u, 0u, 0u);
//% if row_share == "direct"
    for (var i0 = 0u; i0 < k; i0 += 64u) {
        var w = vec4<f32>(0.0);
        if (i0 + li < k) {
            for (var q = 0u; q < n; q++) {
                w[q] = weff1(p.g, q * k + i0 + li, mkey);
            }
        }
        chunk[li] = w;
        workgroupBarrier();
        for (var j = 0u; j < min(64u, k - i0); j++) {
            acc += mul(fwd_gather(ri, kp), chunk[j]);
            kp = kpos_next(kp);
        }
        workgroupBarrier();
    }
//% else
    for (var i0 = 0u; i0 < k; i0 += 8u) {
        var w = vec4<f32>(0.0);
        if (i0 + lane.lane8 < k) {
            for (var q = 0u; q < n; q++) {
                w[q] = weff1(p.g, q * k + i0 + lane.lane8, mkey);
            }
        }
//% for j in range(8)
        if (i0 + {{ j }}u < k) {
            acc += mul(fwd_gather(ri, kp), {{ octet.share("w", j) | trim }});
            kp = kpos_next(kp);
        }
//% endfor
    }
//% endif
    if (m < rows) {
        let ohw = p.oh * p.ow;
        let base = (m / ohw) * n * ohw + m % ohw;
        for (var q = 0u; q < n; q++) {
            y[base + q * ohw] = acc[q];
        }
    }
}

// Effective weights [co, ci, tap] of every input channel ci (< 4) of the narrow input
// gradients, where tap = ky * kw + kx.
fn weff_inputs(co: u32, tap: u32, mkey: u32) -> vec4<f32> {
    var w = vec4<f32>(0.0);
    for (var q = 0u; q < p.cin; q++) {
        w[q] = weff1(p.g, (co * p.cin + q) * p.kh * p.kw + tap, mkey);
    }
    return w;
}

// The K loop of both narrow input gradients: step i's weights for the lane's input channels
// (`weights`, an expression of i), shared across the workgroup, times the upstream gradient of
// step i at the lane's position (`gather`, advanced by `advance` in step order).
//% macro narrow_k_loop(weights, gather, advance)
//% if row_share == "direct"
    let step = 64u;
    let mine = li;
//% else
    let step = 8u;
    let mine = lane.lane8;
//% endif
    for (var i0 = 0u; i0 < k; i0 += step) {
        var w = vec4<f32>(0.0);
        let i = i0 + mine;
        if (i < k) {
            w = {{ weights }};
        }
//% if row_share == "direct"
        chunk[li] = w;
        workgroupBarrier();
        for (var j = 0u; j < min(64u, k - i0); j++) {
            acc += mul({{ gather }}, chunk[j]);
            {{ advance }};
        }
        workgroupBarrier();
//% else
//% for j in range(8)
        if (i0 + {{ j }}u < k) {
            acc += mul({{ gather }}, {{ octet.share("w", j) | trim }});
            {{ advance }};
        }
//% endfor
//% endif
    }
//% endmacro

// Weights of step i of a residue class in grad_input_strided_narrow: output channel i / taps,
// tap (ky0 + s jy, kx0 + s jx) with (jy, jx) the class's tap i % taps.
fn weff_class(i: u32, taps: u32, ntx: u32, ky0: u32, kx0: u32, mkey: u32) -> vec4<f32> {
    let t = i % taps;
    let s = p.stride;
    return weff_inputs(i / taps, (ky0 + s * (t / ntx)) * p.kw + kx0 + s * (t % ntx), mkey);
}

// grad_input for cin <= 4: one lane per input position.
@compute @workgroup_size(64)
fn grad_input_narrow({{ octet.entry_args() }}) {
{{ octet.lane_setup() }}
    let m = linear_workgroup(wid, nwg) * 64u + li;
    let rows = p.batch * p.h * p.w;
    let n = p.cin;
    let khw = p.kh * p.kw;
    let k = p.cout * khw;
    let ri = bwd_row(m);
    let mkey = step_mask_key(p.g);
    var acc = vec4<f32>(0.0);
    var kp = KPos(0u, 0u, 0u);
    // K step i is (co, ky, kx); its weights are [co, ci, ky, kx] for the lane's ci.
{{ narrow_k_loop("weff_inputs(i / khw, i % khw, mkey)", "bwd_gather(ri, kp)", "kp = kpos_next(kp)") }}
    if (m < rows) {
        let hw = p.h * p.w;
        let base = (m / hw) * n * hw + m % hw;
        for (var q = 0u; q < n; q++) {
            dx[base + q * hw] = acc[q];
        }
    }
}

// grad_input for cin <= 4 and stride > 1. An input position (iy, ix) only meets the taps with
// ky = (iy + pad) mod stride (mod stride), likewise kx: a quarter of them for stride 2. The
// lanes are ordered by that residue class, each class padded to whole workgroups, so that every
// lane of a workgroup walks the same short list of (co, ky, kx) and the weights can be shared;
// the output position of tap j is then (oy0 - jy, ox0 - jx) with no division in the loop.
@compute @workgroup_size(64)
fn grad_input_strided_narrow({{ octet.entry_args() }}) {
{{ octet.lane_setup() }}
    let s = p.stride;
    let qh = (p.h + s - 1u) / s;
    let qw = (p.w + s - 1u) / s;
    let per_class = ((p.batch * qh * qw + 63u) / 64u) * 64u;
    let m = linear_workgroup(wid, nwg) * 64u + li;
    let residue = min(m / per_class, s * s - 1u);
    let r = m % per_class;
    let py = residue / s;
    let px = residue % s;
    let b = r / (qh * qw);
    let iy = py + s * ((r % (qh * qw)) / qw);
    let ix = px + s * (r % qw);
    let live = m < per_class * s * s && b < p.batch && iy < p.h && ix < p.w;
    // First tap of the class and the output position it reaches.
    let ky0 = (py + p.pad) % s;
    let kx0 = (px + p.pad) % s;
    let nty = select(0u, (p.kh - ky0 + s - 1u) / s, ky0 < p.kh);
    let ntx = select(0u, (p.kw - kx0 + s - 1u) / s, kx0 < p.kw);
    let taps = nty * ntx;
    let oy0 = i32(iy + p.pad - ky0) / i32(s);
    let ox0 = i32(ix + p.pad - kx0) / i32(s);
    let n = p.cin;
    let k = p.cout * taps;
    let dy_base = min(b, p.batch - 1u) * p.cout * p.oh * p.ow;
    let mkey = step_mask_key(p.g);
    var acc = vec4<f32>(0.0);
    var tp = TapPos(0u, 0u, 0u);
    // Step i is (co, jy, jx); its weights are [co, ci, ky0 + s jy, kx0 + s jx].
{{ narrow_k_loop("weff_class(i, taps, ntx, ky0, kx0, mkey)", "strided_gather(tp, dy_base, oy0, ox0)", "tp = tap_next(tp, nty, ntx)") }}
    if (live) {
        let hw = p.h * p.w;
        let base = b * n * hw + iy * p.w + ix;
        for (var q = 0u; q < n; q++) {
            dx[base + q * hw] = acc[q];
        }
    }
}

// A tap step of grad_input_strided_narrow: output channel and tap (jy, jx) of the class.
struct TapPos {
    co: u32,
    jy: u32,
    jx: u32,
}

fn tap_next(t: TapPos, nty: u32, ntx: u32) -> TapPos {
    var n = t;
    n.jx += 1u;
    if (n.jx == ntx) {
        n.jx = 0u;
        n.jy += 1u;
        if (n.jy == nty) {
            n.jy = 0u;
            n.co += 1u;
        }
    }
    return n;
}

// dy at the output position that tap step t reaches.
fn strided_gather(t: TapPos, dy_base: u32, oy0: i32, ox0: i32) -> f32 {
    let oy = oy0 - i32(t.jy);
    let ox = ox0 - i32(t.jx);
    if (oy < 0 || ox < 0 || oy >= i32(p.oh) || ox >= i32(p.ow)) {
        return 0.0;
    }
    return dy[dy_base + t.co * p.oh * p.ow + u32(oy) * p.ow + u32(ox)];
}

//% if source != "dense"
// grad_score for cout <= 4: one lane per weight column (ci, ky, kx), all (<= 4) rows; the
// output gradient of a position is the same for every lane. Split along K like grad_score;
// p.tiles_total counts the 64-column tiles of one slice.
@compute @workgroup_size(64)
fn grad_score_narrow({{ octet.entry_args() }}) {
    let lin = linear_workgroup(wid, nwg);
    if (lin >= p.tiles_total * p.splits) {
        return;
    }
{{ octet.lane_setup() }}
    let split = lin / p.tiles_total;
    let col = (lin % p.tiles_total) * 64u + li;
    let m = p.cout;
    let n = p.cin * p.kh * p.kw;
    let ohw = p.oh * p.ow;
    let k_total = p.batch * ohw;
    let ci = col_info(col);
    var acc = vec4<f32>(0.0);
    let k_begin = split * p.k_chunk;
    let k_end = min(k_total, k_begin + p.k_chunk);
    var b = k_begin / ohw;
    var oy = (k_begin % ohw) / p.ow;
    var ox = k_begin % p.ow;
//% if row_share == "direct"
    let step = 64u;
    let mine = li;
//% else
    let step = 8u;
    let mine = lane.lane8;
//% endif
    for (var i0 = k_begin; i0 < k_end; i0 += step) {
        // The lane loads the (<= 4) output gradients of position i0 + mine.
        var d = vec4<f32>(0.0);
        let pos = i0 + mine;
        if (pos < k_end) {
            let dbase = (pos / ohw) * p.cout * ohw + pos % ohw;
            for (var q = 0u; q < m; q++) {
                d[q] = dy[dbase + q * ohw];
            }
        }
//% if row_share == "direct"
        chunk[li] = d;
        workgroupBarrier();
        for (var j = 0u; j < min(64u, k_end - i0); j++) {
            acc += chunk[j] * score_gather(ci, b * p.cin * p.h * p.w, oy, ox);
            next_position(&b, &oy, &ox);
        }
        workgroupBarrier();
//% else
//% for j in range(8)
        if (i0 + {{ j }}u < k_end) {
            acc += {{ octet.share("d", j) | trim }} * score_gather(ci, b * p.cin * p.h * p.w, oy, ox);
            next_position(&b, &oy, &ox);
        }
//% endfor
//% endif
    }
    if (col < n) {
        for (var q = 0u; q < m; q++) {
            partial[split * m * n + q * n + col] = acc[q];
        }
    }
}

// grad_score: row co, column n = (ci, ky, kx), K = (b, oy, ox) split into slices. Column info:
// (ci * h * w, ky - pad, kx - pad).
fn col_info(n: u32) -> vec3<i32> {
    let khw = p.kh * p.kw;
    let nn = min(n, p.cin * khw - 1u);
    let ci = nn / khw;
    let r = nn % khw;
    return vec3<i32>(i32(ci * p.h * p.w), i32(r / p.kw) - i32(p.pad), i32(r % p.kw) - i32(p.pad));
}

fn score_gather(ci: vec3<i32>, img: u32, oy: u32, ox: u32) -> f32 {
    let iy = i32(oy * p.stride) + ci.y;
    let ix = i32(ox * p.stride) + ci.z;
    if (iy < 0 || ix < 0 || iy >= i32(p.h) || ix >= i32(p.w)) {
        return 0.0;
    }
    return x[img + u32(ci.x) + u32(iy) * p.w + u32(ix)];
}

@compute @workgroup_size(64)
fn grad_score({{ octet.entry_args() }}) {
    let lin = linear_workgroup(wid, nwg);
    if (lin >= p.tiles_total * p.splits) {
        return;
    }
    let split = lin / p.tiles_total;
    let tile = lin % p.tiles_total;
{{ octet.lane_setup() }}
    let m = p.cout;
    let n = p.cin * p.kh * p.kw;
    let ohw = p.oh * p.ow;
    let k_total = p.batch * ohw;
    let row0 = (tile / p.tiles_n) * R * p.om + lane.om * R;
    let col0 = (tile % p.tiles_n) * 32u * p.on + lane.on * 32u + lane.lane8 * 4u;
    let ci0 = col_info(col0);
    let ci1 = col_info(col0 + 1u);
    let ci2 = col_info(col0 + 2u);
    let ci3 = col_info(col0 + 3u);
//% for r in range(rows)
    var acc{{ r }} = vec4<f32>(0.0);
//% endfor
    let k_begin = split * p.k_chunk;
    let k_end = min(k_total, k_begin + p.k_chunk);
    // (b, oy, ox) of k_begin, then advanced incrementally.
    var b = k_begin / ohw;
    var oy = (k_begin % ohw) / p.ow;
    var ox = k_begin % p.ow;
    // Four positions at a time: their products are summed in registers before they reach an
    // accumulator, so the 32 accumulators (which a CPU adapter keeps in memory) are read and
    // written once per four positions (as in masked_matmul's grad_score). The loop after it
    // takes the rest.
    var i = k_begin;
    for (; i + 4u <= k_end; i += 4u) {
//% for u in range(4)
        let img{{ u }} = b * p.cin * p.h * p.w;
        let dbase{{ u }} = b * p.cout * ohw + oy * p.ow + ox;
        let xv{{ u }} = vec4<f32>(score_gather(ci0, img{{ u }}, oy, ox),
                                  score_gather(ci1, img{{ u }}, oy, ox),
                                  score_gather(ci2, img{{ u }}, oy, ox),
                                  score_gather(ci3, img{{ u }}, oy, ox));
//% if row_share != "direct"
//% for j in range(rows // 8)
        let a{{ u }}_{{ j }} = dy[dbase{{ u }} + min(row0 + lane.lane8 + {{ 8 * j }}u, m - 1u) * ohw];
//% endfor
//% endif
        next_position(&b, &oy, &ox);
//% endfor
//% for r in range(rows)
        {
//% for u in range(4)
//% if row_share == "direct"
            let d{{ u }} = dy[dbase{{ u }} + min(row0 + {{ r }}u, m - 1u) * ohw];
//% else
            let d{{ u }} = {{ octet.share("a" ~ u ~ "_" ~ (r // 8), r % 8) | trim }};
//% endif
//% endfor
            acc{{ r }} += d0 * xv0 + d1 * xv1 + d2 * xv2 + d3 * xv3;
        }
//% endfor
    }
    for (; i < k_end; i++) {
        let img = b * p.cin * p.h * p.w;
        let dbase = b * p.cout * ohw + oy * p.ow + ox;
        let xv = vec4<f32>(score_gather(ci0, img, oy, ox), score_gather(ci1, img, oy, ox),
                           score_gather(ci2, img, oy, ox), score_gather(ci3, img, oy, ox));
//% if row_share != "direct"
//% for j in range(rows // 8)
        let a{{ j }} = dy[dbase + min(row0 + lane.lane8 + {{ 8 * j }}u, m - 1u) * ohw];
//% endfor
//% endif
//% for r in range(rows)
        {
//% if row_share == "direct"
            let d = dy[dbase + min(row0 + {{ r }}u, m - 1u) * ohw];
//% else
            let d = {{ octet.share("a" ~ (r // 8), r % 8) | trim }};
//% endif
            acc{{ r }} += d * xv;
        }
//% endfor
        next_position(&b, &oy, &ox);
    }
    let slice = split * m * n;
//% for r in range(rows)
    if (row0 + {{ r }}u < m) {
        for (var q = 0u; q < 4u; q++) {
            if (col0 + q < n) {
                partial[slice + (row0 + {{ r }}u) * n + col0 + q] = acc{{ r }}[q];
            }
        }
    }
//% endfor
}

fn score_factor(s: f32) -> f32 {
    let q = sigmoid(s);
    if (p.estimator == 0u) {
        return q * q * (1.0 - q);
    }
    return q * (1.0 - q);
}

// grad[i] <- (sum over slices of partial) * w[i] * f(p[i]), one invocation per weight.
@compute @workgroup_size(256)
fn reduce_score(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                @builtin(local_invocation_index) li: u32) {
    let i = linear_workgroup(wid, nwg) * 256u + li;
    let total = p.cout * p.cin * p.kh * p.kw;
    if (i >= total) {
        return;
    }
    var acc = 0.0;
    for (var s = 0u; s < p.splits; s++) {
        acc += partial_in[s * total + i];
    }
    grad[i] = acc * frozen1(p.g, i) * score_factor(scores[i]);
}
//% endif
