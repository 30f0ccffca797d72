//! The documents match the code: README explains every flag of `prism train`, and `.ci/run`
//! runs exactly README's test command.

use std::process::Command;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

fn train_help() -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_prism"))
        .args(["train", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn readme_explains_every_train_flag() {
    let help = train_help();
    let flags: Vec<&str> = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .collect();
    assert!(flags.len() > 30, "parsed only {flags:?}");
    let readme = readme();
    let missing: Vec<&&str> = flags
        .iter()
        .filter(|f| **f != "--help" && !readme.contains(&format!("`{f}")))
        .collect();
    assert!(missing.is_empty(), "README does not explain {missing:?}");
}

#[test]
fn ci_runs_readmes_test_command() {
    let readme = readme();
    let test_cmd = readme
        .split("Run the whole test suite:")
        .nth(1)
        .and_then(|s| s.split("```sh\n").nth(1))
        .and_then(|s| s.lines().next())
        .expect("README has a test command block");
    let ci = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/run")).unwrap();
    assert!(
        ci.lines().any(|l| l.trim() == test_cmd.trim()),
        ".ci/run does not run README's test command {test_cmd:?}"
    );
}

#[test]
fn readmes_train_defaults_are_the_clis() {
    let help = train_help();
    // `--flag <VALUE>` starts a section; its `[default: X]` line follows.
    let mut defaults = Vec::new();
    let mut flag = None;
    for line in help.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("--") {
            flag = rest.split_whitespace().next().map(|f| format!("--{f}"));
        } else if let (Some(f), Some(d)) = (&flag, line.strip_prefix("[default: ")) {
            defaults.push((f.clone(), d.trim_end_matches(']').to_string()));
        }
    }
    assert!(defaults.len() > 15, "parsed only {defaults:?}");
    let readme = readme();
    let mut checked = 0;
    for (flag, default) in &defaults {
        let row = readme
            .lines()
            .find(|l| {
                l.starts_with(&format!("| `{flag}`")) || l.starts_with(&format!("| `{flag} "))
            })
            .unwrap_or_else(|| panic!("README's flag table has no row for {flag}"));
        let cell = row.split('|').nth(2).unwrap().trim().trim_matches('`');
        // Numbers may be written differently (1e-5 and 0.00001).
        let same_number = matches!(
            (cell.parse::<f64>(), default.parse::<f64>()),
            (Ok(a), Ok(b)) if a == b
        );
        if !same_number {
            assert_eq!(cell, default, "README's default of {flag}");
        }
        checked += 1;
    }
    assert_eq!(checked, defaults.len());
}

/// README's exit statuses are the ones the errors map to.
#[test]
fn readmes_exit_codes_are_the_errors() {
    use prism::error::{Error, GpuError};
    let readme = readme();
    let line = readme
        .split("Exit status:")
        .nth(1)
        .expect("README documents the exit status");
    let code_of = |word: &str| -> u8 {
        let at = line
            .find(word)
            .unwrap_or_else(|| panic!("no {word:?} exit status"));
        let before = &line[..at];
        let digits = before.rsplit("**").nth(1).unwrap();
        digits.trim().parse().unwrap()
    };
    assert_eq!(code_of("usage error"), Error::invalid("x").exit_code());
    assert_eq!(code_of("data error"), Error::format("f", "m").exit_code());
    assert_eq!(
        code_of("data error"),
        Error::DataNotFound("d".into()).exit_code()
    );
    let gpu: Error = GpuError::Poll("p".into()).into();
    assert_eq!(code_of("GPU error"), gpu.exit_code());
}
