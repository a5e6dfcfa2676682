//! The fields of an uncoloured log line: `name=value`, separated by spaces; strings and
//! `?` values in their `Debug` form (`backend="10.0.0.9:8080"`), `%` values in their
//! `Display` form (`path=/api`), and the message without its name. This is what
//! `tracing_subscriber::fmt::format::debug_fn` with `delimited(" ")` writes, without
//! passing strings, integers and booleans through `core::fmt`: there every field cost a
//! `write!` with two arguments, about 3k of the 7k instructions of an access line
//! (callgrind, tests/bench middleware scenario). tracing-subscriber has no cheaper field
//! formatter, hence this one.

use std::fmt;

use tracing::field::{Field, Visit};
use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::FormatFields;
use tracing_subscriber::fmt::format::Writer;

/// The field formatter of uncoloured lines.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainFields;

impl<'writer> FormatFields<'writer> for PlainFields {
    fn format_fields<R: RecordFields>(&self, writer: Writer<'writer>, fields: R) -> fmt::Result {
        let mut visitor = Visitor {
            writer,
            result: Ok(()),
            first: true,
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct Visitor<'writer> {
    writer: Writer<'writer>,
    result: fmt::Result,
    first: bool,
}

impl Visitor<'_> {
    /// Writes the separator and `name=` (nothing for the message), then `value`.
    fn field(&mut self, field: &Field, value: impl FnOnce(&mut Writer<'_>) -> fmt::Result) {
        if self.result.is_err() {
            return;
        }
        let writer = &mut self.writer;
        self.result = (|| {
            if !std::mem::take(&mut self.first) {
                writer.write_char(' ')?;
            }
            if field.name() != "message" {
                writer.write_str(field.name())?;
                writer.write_char('=')?;
            }
            value(writer)
        })();
    }
}

impl Visit for Visitor<'_> {
    fn record_str(&mut self, field: &Field, value: &str) {
        self.field(field, |writer| {
            // `Debug` of a string that needs no escape: the string between quotes.
            if value
                .bytes()
                .all(|byte| (b' '..=b'~').contains(&byte) && byte != b'"' && byte != b'\\')
            {
                writer.write_char('"')?;
                writer.write_str(value)?;
                writer.write_char('"')
            } else {
                write!(writer, "{value:?}")
            }
        });
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.field(field, |writer| {
            writer.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.field(field, |writer| {
            writer.write_str(itoa::Buffer::new().format(value))
        });
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.field(field, |writer| {
            writer.write_str(if value { "true" } else { "false" })
        });
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        self.field(field, |writer| write!(writer, "{value:?}"));
    }
}

#[cfg(test)]
mod tests {
    use tracing_subscriber::fmt::MakeWriter;

    use super::*;

    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl<'a> MakeWriter<'a> for Captured {
        type Writer = Captured;
        fn make_writer(&'a self) -> Captured {
            self.clone()
        }
    }

    /// The line `fmt_fields` writes for one event of every field kind.
    fn line(fields: impl for<'w> FormatFields<'w> + Send + Sync + 'static) -> String {
        let captured = Captured::default();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(captured.clone())
            .with_ansi(false)
            .without_time()
            .fmt_fields(fields)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let shown = "a b";
            tracing::info!(
                target: "access",
                path = %shown,
                backend = "10.0.0.9:8080",
                odd = "say \"hi\"\n",
                status = 200u16,
                delta = -3i64,
                cached = true,
                latency_ms = 0.25f64,
                error = ?Some("x"),
                "done {}",
                1
            );
        });
        String::from_utf8(captured.0.lock().expect("lock").clone()).expect("utf-8")
    }

    #[test]
    fn writes_what_debug_fn_delimited_writes() {
        use tracing_subscriber::field::MakeExt as _;
        let reference = tracing_subscriber::fmt::format::debug_fn(|writer, field, value| {
            if field.name() == "message" {
                write!(writer, "{value:?}")
            } else {
                write!(writer, "{field}={value:?}")
            }
        })
        .delimited(" ");
        let ours = line(PlainFields);
        assert_eq!(ours, line(reference));
        assert!(
            ours.contains(
                "done 1 path=a b backend=\"10.0.0.9:8080\" odd=\"say \\\"hi\\\"\\n\" \
                 status=200 delta=-3 cached=true latency_ms=0.25 error=Some(\"x\")"
            ),
            "{ours}"
        );
    }
}
