//! Pipeline cache: one compiled pipeline per (shader variant, entry point), created on first
//! use and shared afterwards.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::shader::{self, Binding, ShaderKey};
use crate::error::GpuError;

/// A compute pipeline with the bindings its entry point uses.
pub(crate) struct PipelineEntry {
    pub pipeline: wgpu::ComputePipeline,
    pub layout: wgpu::BindGroupLayout,
    pub bindings: Vec<Binding>,
    pub label: String,
}

#[derive(Default)]
pub(crate) struct PipelineCache {
    modules: Mutex<HashMap<ShaderKey, Arc<(wgpu::ShaderModule, shader::Compiled)>>>,
    pipelines: Mutex<HashMap<(ShaderKey, String), Arc<PipelineEntry>>>,
    compiled: AtomicU64,
}

impl PipelineCache {
    pub(crate) fn compiled(&self) -> u64 {
        self.compiled.load(Ordering::Relaxed)
    }

    pub(crate) fn get(
        &self,
        device: &wgpu::Device,
        caps: naga::valid::Capabilities,
        key: &ShaderKey,
        entry: &str,
    ) -> Result<Arc<PipelineEntry>, GpuError> {
        let pkey = (key.clone(), entry.to_string());
        if let Some(p) = self
            .pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&pkey)
        {
            return Ok(p.clone());
        }
        let module = self.module(device, caps, key)?;
        let bindings = module.1.bindings(entry, key)?;
        let label = format!("{key}::{entry}");
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let pipeline = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module.0,
            entry_point: Some(entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &[],
                // Kernels initialise their workgroup memory themselves.
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Shader {
                name: label,
                message: e.to_string(),
            });
        }
        let layout = pipeline.get_bind_group_layout(0);
        self.compiled.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(PipelineEntry {
            pipeline,
            layout,
            bindings,
            label,
        });
        self.pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pkey, entry.clone());
        Ok(entry)
    }

    fn module(
        &self,
        device: &wgpu::Device,
        caps: naga::valid::Capabilities,
        key: &ShaderKey,
    ) -> Result<Arc<(wgpu::ShaderModule, shader::Compiled)>, GpuError> {
        if let Some(m) = self
            .modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return Ok(m.clone());
        }
        // Validate with naga first: its messages point at the rendered source line.
        let compiled = shader::compile(key, caps)?;
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = device.create_shader_module(wgpu::ShaderModuleDescriptor {
            label: Some(&key.to_string()),
            source: wgpu::ShaderSource::Wgsl(compiled.source.clone().into()),
        });
        if let Some(e) = pollster::block_on(scope.pop()) {
            return Err(GpuError::Shader {
                name: key.to_string(),
                message: e.to_string(),
            });
        }
        let m = Arc::new((module, compiled));
        self.modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), m.clone());
        Ok(m)
    }
}
