// 2x2 pooling with stride 2 over planes of h x w (PyTorch's MaxPool2d(2) and AvgPool2d(2):
// output h / 2 x w / 2, rounded down, so an odd last row or column is dropped), and the
// adjoints that carry a gradient back to the input. The encoders of the feature-space loss
// (VGG's stages, small conv encoders) pool this way.
//
//   max_forward    out[o] = the largest of its window
//   max_backward   dx[i] = dy[window of i] where x[i] is the first largest of its window
//                  (row-major order, as PyTorch's CPU kernel), else 0; recomputed from x,
//                  so no argmax is stored between the passes
//   avg_forward    out[o] = the mean of its window
//   avg_backward   dx[i] = dy[window of i] / 4 (0 for a dropped row or column)
//
// One invocation per output element (forward) or per input element (backward), so each pass
// writes every element once and needs no atomics.
//% include "common.wgsl"

struct Params {
    n: u32,        // elements this pass writes
    h: u32,        // input height and width
    w: u32,
    oh: u32,       // output height and width
    ow: u32,
    inv_w: f32,    // 1 / (row width of the indexed tensor), for div_small
    inv_h: f32,    // 1 / (height of the indexed tensor), for div_small
    _pad: u32,
}
@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read_write> dx: array<f32>;

fn index(wid: vec3<u32>, nwg: vec3<u32>, li: u32) -> u32 {
    return linear_workgroup(wid, nwg) * 256u + li;
}

// Input index of the top-left element of output element o's window.
fn window_origin(o: u32) -> u32 {
    let row = div_small(o, p.ow, p.inv_w);          // output row of all planes in sequence
    let ox = o - row * p.ow;
    let plane = div_small(row, p.oh, p.inv_h);
    let oy = row - plane * p.oh;
    return (plane * p.h + 2u * oy) * p.w + 2u * ox;
}

// Position (0..3, row-major) of the first largest of the window at `base`.
fn argmax4(base: u32) -> u32 {
    var best = x[base];
    var at = 0u;
    let v1 = x[base + 1u];
    if (v1 > best) { best = v1; at = 1u; }
    let v2 = x[base + p.w];
    if (v2 > best) { best = v2; at = 2u; }
    let v3 = x[base + p.w + 1u];
    if (v3 > best) { at = 3u; }
    return at;
}

// A forward entry point: out[o] = `pooled`(b), b the input index of o's window.
//% macro forward_entry(name, pooled)
@compute @workgroup_size(256)
fn {{ name }}(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let o = index(wid, nwg, li);
    if (o >= p.n) {
        return;
    }
    out[o] = {{ pooled }}(window_origin(o));
}
//% endmacro

fn window_max(b: u32) -> f32 {
    return max(max(x[b], x[b + 1u]), max(x[b + p.w], x[b + p.w + 1u]));
}

fn window_mean(b: u32) -> f32 {
    return 0.25 * ((x[b] + x[b + 1u]) + (x[b + p.w] + x[b + p.w + 1u]));
}

{{ forward_entry("max_forward", "window_max") }}

{{ forward_entry("avg_forward", "window_mean") }}

// For input element i: (output element of its window, its position in the window), or
// (n_out, 0) when i lies in a dropped row or column. Here inv_w = 1 / w and inv_h = 1 / h.
fn window_of(i: u32) -> vec2<u32> {
    let row = div_small(i, p.w, p.inv_w);            // input row of all planes in sequence
    let ix = i - row * p.w;
    let plane = div_small(row, p.h, p.inv_h);
    let iy = row - plane * p.h;
    let ox = ix / 2u;
    let oy = iy / 2u;
    if (ox >= p.ow || oy >= p.oh) {
        return vec2<u32>(0xffffffffu, 0u);
    }
    return vec2<u32>((plane * p.oh + oy) * p.ow + ox, (iy & 1u) * 2u + (ix & 1u));
}

// A backward entry point: dx[i] = `share`(i, window_of(i)) for i inside a window, else 0.
//% macro backward_entry(name, share)
@compute @workgroup_size(256)
fn {{ name }}(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) li: u32) {
    let i = index(wid, nwg, li);
    if (i >= p.n) {
        return;
    }
    let win = window_of(i);
    var g = 0.0;
    if (win.x != 0xffffffffu) {
        g = {{ share }}(i, win);
    }
    dx[i] = g;
}
//% endmacro

// The whole gradient of the window goes to its first largest element.
fn max_share(i: u32, win: vec2<u32>) -> f32 {
    let at = win.y;
    let base = i - (at / 2u) * p.w - (at & 1u);
    return select(0.0, dy[win.x], argmax4(base) == at);
}

fn mean_share(i: u32, win: vec2<u32>) -> f32 {
    return 0.25 * dy[win.x];
}

{{ backward_entry("max_backward", "max_share") }}

{{ backward_entry("avg_backward", "mean_share") }}
