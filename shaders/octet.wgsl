// Octets: the lane arrangement shared by the matmul-like kernels (masked_matmul.wgsl,
// masked_conv.wgsl). A workgroup of 64 lanes is 8 octets of 8 lanes; an octet computes a block
// of rows x 32 outputs, each lane 4 adjacent columns, and the operand values of its rows are
// loaded once per octet and shared among its lanes (template variable `row_share`):
//   broadcast - subgroupBroadcast with constant ids (subgroups of exactly 8 lanes);
//   shuffle   - subgroupShuffle inside each group of 8 (subgroup sizes that are multiples of 8);
//   direct    - no sharing: every lane loads the rows itself (no subgroups needed).
// Included for the declarations below and imported for its macros. The including kernel's
// parameter block must have `on` (octets along N).

// Where a lane sits: its octet (om, on) and its index inside the octet.
struct Lane {
    om: u32,
    on: u32,
    lane8: u32,
    base: u32,  // subgroup lane id of this octet's lane 0 (for shuffles)
}

fn place(octet: u32, lane8: u32, base: u32) -> Lane {
    return Lane(octet / p.on, octet % p.on, lane8, base);
}

//% macro entry_args()
@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) li: u32
//% if row_share != "direct"
    , @builtin(subgroup_invocation_id) sg_lane: u32, @builtin(subgroup_size) sg_size: u32,
    @builtin(subgroup_id) sg_id: u32
//% endif
//% endmacro

//% macro lane_setup()
//% if row_share == "direct"
    let lane = place(li / 8u, li % 8u, 0u);
//% else
    // Position from the subgroup builtins, so that shared values come from the right lanes
    // whatever the mapping of local_invocation_index to subgroups.
    let lane = place((sg_id * sg_size + sg_lane) / 8u, sg_lane % 8u, sg_lane & ~7u);
//% endif
//% endmacro

//% macro share(v, r)
//% if row_share == "broadcast"
subgroupBroadcast({{ v }}, {{ r }}u)
//% elif row_share == "shuffle"
subgroupShuffle({{ v }}, lane.base + {{ r }}u)
//% endif
//% endmacro

// The start of a tiled entry point: its tile, or return past the last one.
//% macro tile_start()
    let tile = linear_workgroup(wid, nwg);
    if (tile >= p.tiles_total) {
        return;
    }
//% endmacro

// The first row and column of the lane's block in a grid of tiles_n tiles along N, each of
// om x on octets.
//% macro tile_origin()
    let row0 = (tile / p.tiles_n) * R * p.om + lane.om * R;
    let col0 = (tile % p.tiles_n) * 32u * p.on + lane.on * 32u + lane.lane8 * 4u;
//% endmacro

// The lane's four columns c0..c3 of n, clamped: columns past n are computed on clamped indices
// and never stored.
//% macro columns()
    let c0 = min(col0, n - 1u);
    let c1 = min(col0 + 1u, n - 1u);
    let c2 = min(col0 + 2u, n - 1u);
    let c3 = min(col0 + 3u, n - 1u);
//% endmacro

// One accumulator per row of the lane's block: acc0 .. acc{rows - 1}, 4 columns each.
//% macro accumulators()
//% for r in range(rows)
    var acc{{ r }} = vec4<f32>(0.0);
//% endfor
//% endmacro


// The inner loops the matmul-like kernels share. Their arguments are WGSL expressions as
// strings with placeholders: @r a row of the lane's block (0 .. rows - 1), @j and @8j the
// index of a block of 8 rows and its first row.

// Before the K loop: each row's decomposition, `head` + the row index + `tail` (a call such
// as fwd_row(m)). Without sharing every lane keeps all its rows (row_info); with sharing, lane
// l of an octet keeps rows l, l + 8, ... (ri0, ri1, ...) and the others read them from it.
//% macro row_info(head, tail)
//% if row_share == "direct"
    var row_info: array<vec3<i32>, {{ rows }}>;
    for (var r = 0u; r < R; r++) {
        row_info[r] = {{ head }}row0 + r{{ tail }};
    }
//% else
//% for j in range(rows // 8)
    let ri{{ j }} = {{ head }}row0 + lane.lane8 + {{ 8 * j }}u{{ tail }};
//% endfor
//% endif
//% endmacro

// In the K loop, before the rows: with sharing, each lane loads the operand of its own rows
// (a0, a1, ...: `load` with @j, @8j).
//% macro shared_loads(load)
//% if row_share != "direct"
//% for j in range(rows // 8)
        let a{{ j }} = {{ load | replace("@8j", "" ~ (8 * j)) | replace("@j", "" ~ j) }};
//% endfor
//% endif
//% endmacro

// In the K loop: every row's operand v (`direct` with @r without sharing, from the lane that
// loaded it with sharing) into its accumulator by `op`:
//   dot4    acc += (v . w0, v . w1, v . w2, v . w3), v a vec4 of 4 K steps (f16 with `half`)
//   scale   acc += v * wv, v the row's value at one K step (f16 with `half`)
//   scale32 the same in f32 whatever `half`
//   combine acc += v.x w0 + v.y w1 + v.z w2 + v.w w3 (4 K steps of 4 columns' weights)
//% macro accumulate(direct, op)
//% for r in range(rows)
        {
//% if row_share == "direct"
            let v = {{ direct | replace("@r", "" ~ r) }};
//% else
            let v = {{ share("a" ~ (r // 8), r % 8) | trim }};
//% endif
//% if op == "dot4" and half
            let vh = vec4<f16>(v);
            acc{{ r }} += vec4<f32>(vec4<f16>(dot(vh, h0), dot(vh, h1), dot(vh, h2), dot(vh, h3)));
//% elif op == "dot4"
            acc{{ r }} += vec4<f32>(dot(v, w0), dot(v, w1), dot(v, w2), dot(v, w3));
//% elif op == "scale" and half
            acc{{ r }} += vec4<f32>(f16(v) * vec4<f16>(wv));
//% elif op == "combine"
            acc{{ r }} += v.x * w0 + v.y * w1 + v.z * w2 + v.w * w3;
//% else
            acc{{ r }} += v * wv;
//% endif
        }
//% endfor
//% endmacro

// In the unaligned K loop: the effective weights of the lane's four columns at one K step
// (wv), `index` being the weight index with @c for the column (c0..c3).
//% macro weights1(index)
        let wv = vec4<f32>(weff1(p.g, {{ index | replace("@c", "c0") }}, mkey), weff1(p.g, {{ index | replace("@c", "c1") }}, mkey),
                           weff1(p.g, {{ index | replace("@c", "c2") }}, mkey), weff1(p.g, {{ index | replace("@c", "c3") }}, mkey));
//% endmacro

// Before the aligned K loop: the sign words that weights4 refreshes.
//% macro sign_words()
    var sw0 = 0u;
    var sw1 = 0u;
    var sw2 = 0u;
    var sw3 = 0u;
//% endmacro

// In the aligned K loop (4 steps at i): the weights of the lane's four columns c0..c3 at
// K = i .. i + 3 (w0..w3, and h0..h3 in f16 with `half`), with the sign words sw0..sw3
// refreshed when a column enters a new block of 32 (or when `first`).
//% macro weights4(first)
//% if source != "dense"
        // One sign draw covers 32 weights of a row: refresh when a column enters a new block.
        if (((c0 * k + i) & 31u) == 0u || {{ first }}) { sw0 = sign_word(p.g, c0 * k + i); }
        if (((c1 * k + i) & 31u) == 0u || {{ first }}) { sw1 = sign_word(p.g, c1 * k + i); }
        if (((c2 * k + i) & 31u) == 0u || {{ first }}) { sw2 = sign_word(p.g, c2 * k + i); }
        if (((c3 * k + i) & 31u) == 0u || {{ first }}) { sw3 = sign_word(p.g, c3 * k + i); }
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
//% endmacro
