//! Reading values from the gateway's `/metrics` page (Prometheus text format).

/// The value of the sample whose series (name and labels, as printed) is exactly `series`.
pub fn value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .filter_map(|line| line.rsplit_once(' '))
        .find(|(name, _)| *name == series)
        .and_then(|(_, value)| value.parse().ok())
}

/// The sum of the samples of `family` carrying every label in `labels` (other labels may
/// differ), or `None` when there is none.
pub fn sum(page: &str, family: &str, labels: &[(&str, &str)]) -> Option<f64> {
    page.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| {
            line.strip_prefix(family)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .filter(|line| {
            labels
                .iter()
                .all(|(k, v)| line.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .reduce(|a, b| a + b)
}

/// The series counting requests `middleware` refused on endpoint `path` for `reason`.
pub fn denied(middleware: &str, path: &str, reason: &str) -> String {
    format!(
        "go_gateway_middleware_denied_total{{middleware=\"{middleware}\",path=\"{path}\",reason=\"{reason}\"}}"
    )
}

/// The series counting failed builds of `middleware`.
pub fn build_failures(middleware: &str) -> String {
    format!("go_gateway_middleware_build_failures_total{{middleware=\"{middleware}\"}}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP x_total X.\n# TYPE x_total counter\nx_total{a=\"1\",b=\"2\"} 3\nx_total{a=\"1\",b=\"3\"} 4\nx_total_more{a=\"1\"} 100\ny 7\n";

    #[test]
    fn value_matches_the_whole_series() {
        assert_eq!(value(PAGE, "x_total{a=\"1\",b=\"2\"}"), Some(3.0));
        assert_eq!(value(PAGE, "x_total{a=\"1\"}"), None);
        assert_eq!(value(PAGE, "y"), Some(7.0));
    }

    #[test]
    fn sum_adds_the_matching_samples_of_one_family() {
        assert_eq!(sum(PAGE, "x_total", &[("a", "1")]), Some(7.0));
        assert_eq!(sum(PAGE, "x_total", &[("b", "3")]), Some(4.0));
        assert_eq!(sum(PAGE, "x_total", &[("b", "9")]), None);
    }
}
