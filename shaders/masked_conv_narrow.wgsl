// Narrow forms of masked_conv.wgsl (included by it; see its header): forward and input
// gradients for at most 4 channels on the N side, one lane per position.
//% import "octet.wgsl" as octet

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
