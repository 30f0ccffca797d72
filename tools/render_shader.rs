//! Prints a rendered shader variant: `cargo run --example render_shader -- FILE [name=value ...]`.
//! Handy when reading or debugging the templates in shaders/.

use prism::gpu::shader::{render, Def, ShaderKey, SOURCES};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(file) = args.first() else {
        eprintln!(
            "usage: render_shader FILE [name=value ...]; files: {:?}",
            SOURCES.iter().map(|s| s.0).collect::<Vec<_>>()
        );
        std::process::exit(2);
    };
    let Some(&(name, _)) = SOURCES.iter().find(|s| s.0 == file) else {
        eprintln!("unknown shader {file}");
        std::process::exit(2);
    };
    let mut key = ShaderKey::new(name);
    for a in &args[1..] {
        let Some((k, v)) = a.split_once('=') else {
            eprintln!("expected name=value, got {a}");
            std::process::exit(2);
        };
        let k: &'static str = Box::leak(k.to_string().into_boxed_str());
        let d = match v {
            "true" => Def::Bool(true),
            "false" => Def::Bool(false),
            _ => v
                .parse::<i64>()
                .map(Def::Int)
                .unwrap_or(Def::Str(v.to_string())),
        };
        key = key.def(k, d);
    }
    match render(&key) {
        Ok(s) => print!("{s}"),
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(1);
        }
    }
}
