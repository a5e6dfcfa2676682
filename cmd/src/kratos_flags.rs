//! Kratos' single-dash flag spellings (`-conf`, `-conf.priority`, `-discovery.dsn`, ...),
//! accepted as aliases of this binary's flags so a go-kratos/gateway command line starts
//! this gateway unchanged. Go's `flag` package also takes `-name=value` and `--name`, so
//! both forms are mapped. clap has no single-dash long flags, hence this rewrite of the
//! argument list before parsing.

use std::ffi::OsString;

/// Kratos' flag names and ours.
const ALIASES: [(&str, &str); 7] = [
    ("conf", "--conf"),
    ("conf.priority", "--priority-dir"),
    ("addr", "--addr"),
    ("debug", "--debug"),
    ("discovery.dsn", "--discovery"),
    ("ctrl.service", "--ctrl-service"),
    ("ctrl.name", "--ctrl-name"),
];

/// `args` (program name first) with every Kratos spelling replaced by ours; everything
/// else, including values and arguments after `--`, is kept as it is.
pub fn rewrite(args: impl IntoIterator<Item = OsString>) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut rest_verbatim = false;
    for (index, arg) in args.into_iter().enumerate() {
        if index == 0 || rest_verbatim {
            out.push(arg);
            continue;
        }
        let Some(text) = arg.to_str() else {
            out.push(arg);
            continue;
        };
        if text == "--" {
            rest_verbatim = true;
            out.push(arg);
            continue;
        }
        out.push(alias(text).map_or(arg, OsString::from));
    }
    out
}

/// Our spelling of one Kratos-style argument (`-conf`, `-conf=x`, `--conf.priority=x`).
fn alias(arg: &str) -> Option<String> {
    let bare = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-'))?;
    let (name, value) = match bare.split_once('=') {
        Some((name, value)) => (name, Some(value)),
        None => (bare, None),
    };
    let (_, ours) = ALIASES.iter().find(|(kratos, _)| *kratos == name)?;
    // `--conf` and `--addr` are already ours: only rewrite what clap would not take.
    if arg.starts_with("--") && !name.contains('.') {
        return None;
    }
    Some(match value {
        Some(value) => format!("{ours}={value}"),
        None => (*ours).to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rewritten(args: &[&str]) -> Vec<String> {
        rewrite(args.iter().map(OsString::from))
            .into_iter()
            .map(|arg| arg.into_string().unwrap())
            .collect()
    }

    #[test]
    fn kratos_spellings_become_ours() {
        assert_eq!(
            rewritten(&[
                "gateway",
                "-conf",
                "a.yaml",
                "-conf.priority=./canary",
                "-addr",
                "0.0.0.0:8080",
                "-discovery.dsn",
                "consul://127.0.0.1:8500",
                "-debug",
                "--ctrl.service=http://ctrl",
                "-ctrl.name",
                "gw",
            ]),
            [
                "gateway",
                "--conf",
                "a.yaml",
                "--priority-dir=./canary",
                "--addr",
                "0.0.0.0:8080",
                "--discovery",
                "consul://127.0.0.1:8500",
                "--debug",
                "--ctrl-service=http://ctrl",
                "--ctrl-name",
                "gw",
            ]
        );
    }

    #[test]
    fn our_flags_values_and_unknown_flags_are_left_alone() {
        let args = [
            "gateway",
            "--conf",
            "-conf",
            "--addr=1.2.3.4:80",
            "-x",
            "--",
            "-debug",
        ];
        // A value that looks like a Kratos flag is still rewritten (as Go's flag package
        // would also read it as a flag), unknown flags are clap's to refuse, and nothing
        // after `--` is touched.
        assert_eq!(
            rewritten(&args),
            [
                "gateway",
                "--conf",
                "--conf",
                "--addr=1.2.3.4:80",
                "-x",
                "--",
                "-debug"
            ]
        );
    }
}
