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

