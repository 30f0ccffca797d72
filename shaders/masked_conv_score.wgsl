// Score gradients of masked_conv.wgsl (included by it; see its header): dL/ds of the
// narrow and tiled forms, split along K, and the reduction of the K slices.
//% import "octet.wgsl" as octet

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
{{ octet.tile_origin() }}
    let ci0 = col_info(col0);
    let ci1 = col_info(col0 + 1u);
    let ci2 = col_info(col0 + 2u);
    let ci3 = col_info(col0 + 3u);
{{ octet.accumulators() }}
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
