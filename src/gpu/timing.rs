//! Timing of kernels: GPU timestamps around one compute pass where the adapter has
//! TIMESTAMP_QUERY, wall clock around submit-and-wait otherwise.

use std::time::{Duration, Instant};

use super::{Gpu, Kernel};
use crate::error::GpuError;

/// How a duration was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Clock {
    GpuTimestamps,
    WallClock,
}

impl Gpu {
    /// Which clock [`Gpu::time_kernels`] uses on this device.
    pub fn clock(&self) -> Clock {
        if self.features().timestamps {
            Clock::GpuTimestamps
        } else {
            Clock::WallClock
        }
    }

    /// Records the kernels `reps` times into one compute pass, runs it, and returns the time of
    /// the whole pass (GPU timestamps where available, so launch overhead on the host is not
    /// counted).
    pub fn time_kernels(&self, kernels: &[&Kernel], reps: u32) -> Result<Duration, GpuError> {
        let reps = reps.max(1);
        if !self.features().timestamps {
            let t = Instant::now();
            let mut enc = self.device.create_command_encoder(&Default::default());
            {
                let mut pass = enc.begin_compute_pass(&Default::default());
                for _ in 0..reps {
                    for k in kernels {
                        k.record(&mut pass);
                    }
                }
            }
            self.queue.submit([enc.finish()]);
            self.sync()?;
            return Ok(t.elapsed());
        }
        let set = self.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("prism timing"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let resolve = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps"),
            size: 16,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let read = self.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("timestamps readback"),
            size: 16,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = self.device.create_command_encoder(&Default::default());
        {
            let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("timed"),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: &set,
                    beginning_of_pass_write_index: Some(0),
                    end_of_pass_write_index: Some(1),
                }),
            });
            for _ in 0..reps {
                for k in kernels {
                    k.record(&mut pass);
                }
            }
        }
        enc.resolve_query_set(&set, 0..2, &resolve, 0);
        enc.copy_buffer_to_buffer(&resolve, 0, &read, 0, 16);
        self.queue.submit([enc.finish()]);
        let slice = read.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        self.sync()?;
        rx.recv()
            .map_err(|_| GpuError::Map("timestamp map never completed".into()))?
            .map_err(|e| GpuError::Map(e.to_string()))?;
        let ticks: [u64; 2] = {
            let view = slice
                .get_mapped_range()
                .map_err(|e| GpuError::Map(e.to_string()))?;
            bytemuck::pod_read_unaligned(&view[..16])
        };
        read.unmap();
        let ns =
            ticks[1].saturating_sub(ticks[0]) as f64 * self.queue.get_timestamp_period() as f64;
        Ok(Duration::from_nanos(ns as u64))
    }
}
