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
//
// Files: this one holds the tiled forward and input gradients; masked_conv_narrow.wgsl the
// narrow ones and masked_conv_score.wgsl the score gradients, both included at its end.
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

// The store of a block of rows m = (b, position) by 4 columns c into out[b, c, position] (NCHW),
// `plane` positions per channel.
//% macro store_planes(out, plane)
    let plane = {{ plane }};
//% for r in range(rows)
    if (row0 + {{ r }}u < m) {
        let mm = row0 + {{ r }}u;
        let base = (mm / plane) * n * plane + mm % plane;
        for (var q = 0u; q < 4u; q++) {
            if (col0 + q < n) {
                {{ out }}[base + (col0 + q) * plane] = acc{{ r }}[q];
            }
        }
    }
//% endfor
//% endmacro

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
{{ octet.tile_start() }}
{{ octet.lane_setup() }}
    let m = p.batch * p.oh * p.ow;
    let n = p.cout;
    let k = p.cin * p.kh * p.kw;
{{ octet.tile_origin() }}
{{ octet.columns() }}
    let mkey = step_mask_key(p.g);
{{ octet.row_info("fwd_row(", ")") }}
{{ octet.accumulators() }}
    var kp = KPos(0u, 0u, 0u);
//% if aligned
{{ octet.sign_words() }}
    for (var i = 0u; i < k; i += 4u) {
        let k0 = kp;
        let k1 = kpos_next(k0);
        let k2 = kpos_next(k1);
        let k3 = kpos_next(k2);
        kp = kpos_next(k3);
{{ octet.shared_loads("fwd_gather4(ri@j, k0, k1, k2, k3)") }}
{{ octet.weights4("i == 0u") }}
{{ octet.accumulate("fwd_gather4(row_info[@r], k0, k1, k2, k3)", "dot4") }}
    }
//% else
    for (var i = 0u; i < k; i++) {
{{ octet.shared_loads("fwd_gather(ri@j, kp)") }}
{{ octet.weights1("@c * k + i") }}
{{ octet.accumulate("fwd_gather(row_info[@r], kp)", "scale") }}
        kp = kpos_next(kp);
    }
//% endif
    // Store: row m = (b, oy, ox), column co -> y[b, co, oy, ox].
{{ store_planes("y", "p.oh * p.ow") }}
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
{{ octet.tile_start() }}
{{ octet.lane_setup() }}
    let m = p.batch * p.h * p.w;
    let n = p.cin;
    let khw = p.kh * p.kw;
    let k = p.cout * khw;
{{ octet.tile_origin() }}
{{ octet.columns() }}
    let mkey = step_mask_key(p.g);
{{ octet.row_info("bwd_row(", ")") }}
{{ octet.accumulators() }}
    var kp = KPos(0u, 0u, 0u);
    for (var i = 0u; i < k; i++) {
{{ octet.shared_loads("bwd_gather(ri@j, kp)") }}
        // Weight [co, ci, ky, kx] for the lane's four ci.
        let wi = kp.c * n * khw + kp.ky * p.kw + kp.kx;
{{ octet.weights1("wi + @c * khw") }}
{{ octet.accumulate("bwd_gather(row_info[@r], kp)", "scale") }}
        kp = kpos_next(kp);
    }
{{ store_planes("dx", "p.h * p.w") }}
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
{{ octet.tile_start() }}
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
{{ octet.columns() }}
    let mkey = step_mask_key(p.g);
{{ octet.row_info("strided_class_row(", ", per_class, qh, qw, py, px, ky0, kx0)") }}
{{ octet.accumulators() }}
    var tp = TapPos(0u, 0u, 0u);
    for (var i = 0u; i < k; i++) {
{{ octet.shared_loads("strided_class_gather(ri@j, tp)") }}
        // Weight [co, ci, ky0 + s jy, kx0 + s jx] for the lane's four ci.
        let wi = tp.co * n * khw + (ky0 + s * tp.jy) * p.kw + kx0 + s * tp.jx;
{{ octet.weights1("wi + @c * khw") }}
{{ octet.accumulate("strided_class_gather(row_info[@r], tp)", "scale") }}
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

//% include "masked_conv_narrow.wgsl"
//% include "masked_conv_score.wgsl"
