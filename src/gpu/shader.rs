//! Shader assembly: the WGSL files in `shaders/` are small templates.
//!
//! Lines starting with `//%` are template statements (`//% include "rng.wgsl"`,
//! `//% for r in range(8)`, `//% if subgroups`), and `{{ expr }}` substitutes a value, so a file
//! still reads as WGSL. Templates exist for two reasons only: `subgroupBroadcast` needs a
//! constant lane index (so the row-sharing loops are unrolled in text), and kernels have
//! variants per device capability (subgroups or not, f16 or not) and per weight source.
//!
//! [`compile`] renders, parses and validates with naga (no GPU needed), and reflects which
//! bindings an entry point uses, so launchers bind buffers by variable name.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::GpuError;

/// Every shader file, embedded at build time.
pub const SOURCES: &[(&str, &str)] = &[
    ("common.wgsl", include_str!("../../shaders/common.wgsl")),
    ("rng.wgsl", include_str!("../../shaders/rng.wgsl")),
    ("weights.wgsl", include_str!("../../shaders/weights.wgsl")),
    ("mask.wgsl", include_str!("../../shaders/mask.wgsl")),
    ("octet.wgsl", include_str!("../../shaders/octet.wgsl")),
    (
        "masked_matmul.wgsl",
        include_str!("../../shaders/masked_matmul.wgsl"),
    ),
    (
        "masked_conv.wgsl",
        include_str!("../../shaders/masked_conv.wgsl"),
    ),
    (
        "masked_conv_narrow.wgsl",
        include_str!("../../shaders/masked_conv_narrow.wgsl"),
    ),
    (
        "masked_conv_score.wgsl",
        include_str!("../../shaders/masked_conv_score.wgsl"),
    ),
    ("norm.wgsl", include_str!("../../shaders/norm.wgsl")),
    (
        "elementwise.wgsl",
        include_str!("../../shaders/elementwise.wgsl"),
    ),
    ("adam.wgsl", include_str!("../../shaders/adam.wgsl")),
    (
        "adam_update.wgsl",
        include_str!("../../shaders/adam_update.wgsl"),
    ),
    ("mmd.wgsl", include_str!("../../shaders/mmd.wgsl")),
    ("data.wgsl", include_str!("../../shaders/data.wgsl")),
    ("pool.wgsl", include_str!("../../shaders/pool.wgsl")),
    ("moments.wgsl", include_str!("../../shaders/moments.wgsl")),
];

/// A template variable's value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Def {
    Bool(bool),
    Int(i64),
    Str(String),
}

impl From<bool> for Def {
    fn from(v: bool) -> Self {
        Def::Bool(v)
    }
}
impl From<u32> for Def {
    fn from(v: u32) -> Self {
        Def::Int(v as i64)
    }
}
impl From<i64> for Def {
    fn from(v: i64) -> Self {
        Def::Int(v)
    }
}
impl From<&str> for Def {
    fn from(v: &str) -> Self {
        Def::Str(v.to_string())
    }
}

impl fmt::Display for Def {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Def::Bool(b) => write!(f, "{b}"),
            Def::Int(i) => write!(f, "{i}"),
            Def::Str(s) => write!(f, "{s}"),
        }
    }
}

/// One rendered variant of a shader file: the file and its template variables.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShaderKey {
    pub file: &'static str,
    pub defs: BTreeMap<&'static str, Def>,
}

impl ShaderKey {
    pub fn new(file: &'static str) -> Self {
        Self {
            file,
            defs: BTreeMap::new(),
        }
    }

    /// Sets a template variable.
    pub fn def(mut self, name: &'static str, value: impl Into<Def>) -> Self {
        self.defs.insert(name, value.into());
        self
    }

    /// Sets variables unless already set (device-wide defaults under kernel-specific ones).
    pub fn with_defaults(mut self, defaults: &BTreeMap<&'static str, Def>) -> Self {
        for (k, v) in defaults {
            self.defs.entry(k).or_insert_with(|| v.clone());
        }
        self
    }
}

impl fmt::Display for ShaderKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if !self.defs.is_empty() {
            let d: Vec<String> = self.defs.iter().map(|(k, v)| format!("{k}={v}")).collect();
            write!(f, "[{}]", d.join(","))?;
        }
        Ok(())
    }
}

fn environment() -> minijinja::Environment<'static> {
    let mut env = minijinja::Environment::new();
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .line_statement_prefix("//%")
        .build()
        .expect("static template syntax is valid");
    env.set_syntax(syntax);
    env.set_undefined_behavior(minijinja::UndefinedBehavior::SemiStrict);
    env.set_loader(|name| {
        Ok(SOURCES
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, src)| src.to_string()))
    });
    env
}

/// Renders a shader variant to plain WGSL.
pub fn render(key: &ShaderKey) -> Result<String, GpuError> {
    let env = environment();
    let err = |e: minijinja::Error| GpuError::Shader {
        name: key.to_string(),
        message: format!("template: {e:#}"),
    };
    let tmpl = env.get_template(key.file).map_err(err)?;
    let ctx = minijinja::Value::from_pairs(key.defs.iter().map(|(k, v)| {
        let val = match v {
            Def::Bool(b) => minijinja::Value::from(*b),
            Def::Int(i) => minijinja::Value::from(*i),
            Def::Str(s) => minijinja::Value::from(s.clone()),
        };
        (k.to_string(), val)
    }));
    tmpl.render(ctx).map_err(err)
}

/// A rendered, parsed and validated shader.
pub struct Compiled {
    pub source: String,
    pub module: naga::Module,
    pub info: naga::valid::ModuleInfo,
}

/// Naga capabilities for validation, matching the features the device was opened with.
pub fn capabilities(subgroups: bool, f16: bool) -> naga::valid::Capabilities {
    let mut caps = naga::valid::Capabilities::empty();
    if subgroups {
        caps |= naga::valid::Capabilities::SUBGROUP;
    }
    if f16 {
        caps |= naga::valid::Capabilities::SHADER_FLOAT16;
    }
    caps
}

/// Renders, parses and validates a variant. Needs no GPU.
pub fn compile(key: &ShaderKey, caps: naga::valid::Capabilities) -> Result<Compiled, GpuError> {
    let source = render(key)?;
    let module = naga::front::wgsl::parse_str(&source).map_err(|e| GpuError::Shader {
        name: key.to_string(),
        message: e.emit_to_string(&source),
    })?;
    let mut validator = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), caps);
    if caps.contains(naga::valid::Capabilities::SUBGROUP) {
        validator
            .subgroup_stages(naga::valid::ShaderStages::COMPUTE)
            .subgroup_operations(naga::valid::SubgroupOperationSet::all());
    }
    let info = validator.validate(&module).map_err(|e| GpuError::Shader {
        name: key.to_string(),
        message: e.emit_to_string(&source),
    })?;
    Ok(Compiled {
        source,
        module,
        info,
    })
}

/// A resource an entry point uses: its WGSL name and binding number (group 0).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    pub name: String,
    pub binding: u32,
}

impl Compiled {
    /// Names of the compute entry points.
    pub fn entry_points(&self) -> Vec<String> {
        self.module
            .entry_points
            .iter()
            .map(|e| e.name.clone())
            .collect()
    }

    /// The group-0 bindings that `entry` uses, sorted by binding number.
    pub fn bindings(&self, entry: &str, shader: &ShaderKey) -> Result<Vec<Binding>, GpuError> {
        let index = self
            .module
            .entry_points
            .iter()
            .position(|e| e.name == entry)
            .ok_or_else(|| GpuError::Shader {
                name: shader.to_string(),
                message: format!("no entry point named {entry}"),
            })?;
        let uses = self.info.get_entry_point(index);
        let mut out = Vec::new();
        for (handle, var) in self.module.global_variables.iter() {
            if uses[handle].is_empty() {
                continue;
            }
            if let Some(rb) = &var.binding {
                if rb.group != 0 {
                    return Err(GpuError::Shader {
                        name: shader.to_string(),
                        message: format!("binding group {} is not used by prism", rb.group),
                    });
                }
                out.push(Binding {
                    name: var.name.clone().unwrap_or_default(),
                    binding: rb.binding,
                });
            }
        }
        out.sort_by_key(|b| b.binding);
        Ok(out)
    }
}
