//! `bench report`: reads JSON results, groups them by label, and prints the
//! medians as markdown tables; with `--svg`, draws latency by rate (from
//! `saturate`) and cross-instance latency by poll interval (from `cluster`).

use std::path::Path;

use anyhow::{Context, anyhow};
use plotters::prelude::*;

use super::ReportArgs;
use super::report::{LoadResult, Outcome, Report};

/// Runs `bench report`.
pub fn main(args: &ReportArgs) -> anyhow::Result<()> {
    let mut reports = Vec::new();
    for file in &args.files {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("could not read {}", file.display()))?;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let report: Report = serde_json::from_str(line)
                .with_context(|| format!("{} holds a line that is not a report", file.display()))?;
            reports.push(report);
        }
    }
    print!("{}", markdown(&reports));
    if let Some(svg) = &args.svg {
        chart(&reports, svg)?;
    }
    Ok(())
}

/// Reports grouped by label (or workload), in first-seen order.
fn groups(reports: &[Report]) -> Vec<(String, Vec<&Report>)> {
    let mut out: Vec<(String, Vec<&Report>)> = Vec::new();
    for r in reports {
        let key = r.label.clone().unwrap_or_else(|| r.workload.clone());
        match out.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(r),
            None => out.push((key, vec![r])),
        }
    }
    out
}

/// The median of `values` (0 when empty).
pub fn median(mut values: Vec<f64>) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 1 {
        values[mid]
    } else {
        (values[mid - 1] + values[mid]) / 2.0
    }
}

fn loads<'a>(group: &[&'a Report]) -> Vec<&'a LoadResult> {
    group
        .iter()
        .filter_map(|r| match &r.outcome {
            Outcome::Load(l) => Some(&**l),
            _ => None,
        })
        .collect()
}

/// The medians as markdown tables.
pub fn markdown(reports: &[Report]) -> String {
    let groups = groups(reports);
    let mut out = String::new();
    let load_groups: Vec<_> = groups
        .iter()
        .map(|(k, g)| (k, loads(g)))
        .filter(|(_, l)| !l.is_empty())
        .collect();
    if !load_groups.is_empty() {
        out.push_str("| point | runs | connections | msg/s offered | deliveries/s | p50 ms | p99 ms | p99.9 ms | max ms | lost | duplicates | server CPU µs/delivery (user) | server CPU busy | generator CPU busy |\n");
        out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
        for (key, runs) in &load_groups {
            let m = |f: fn(&LoadResult) -> f64| median(runs.iter().map(|r| f(r)).collect());
            let cpu = if runs.iter().all(|r| r.server.is_some()) {
                format!(
                    "{:.2} ({:.2} user)",
                    m(|r| r.server.as_ref().map_or(0.0, |s| s.cpu_us_per_delivery)),
                    m(|r| r.server.as_ref().map_or(0.0, |s| s.user_us_per_delivery))
                )
            } else {
                "-".to_owned()
            };
            let busy = |cpu: fn(&LoadResult) -> f64| {
                let shares = runs.iter().map(|r| cpu(r) / r.window_ms.max(1.0)).collect();
                format!("{:.0}%", 100.0 * median(shares))
            };
            let server_busy = if cpu == "-" {
                "-".to_owned()
            } else {
                busy(|r| r.server.as_ref().map_or(0.0, |s| s.cpu_ms as f64))
            };
            let generator_busy = busy(|r| r.generator_cpu_ms as f64);
            out.push_str(&format!(
                "| {key} | {} | {:.0} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.0} | {cpu} | {server_busy} | {generator_busy} |\n",
                runs.len(),
                m(|r| r.connections as f64),
                m(|r| r.rate),
                m(|r| r.deliveries_per_s),
                m(|r| r.latency.p50_ms),
                m(|r| r.latency.p99_ms),
                m(|r| r.latency.p999_ms),
                m(|r| r.latency.max_ms),
                m(|r| r.lost as f64),
                m(|r| r.duplicates as f64),
            ));
        }
        out.push('\n');
    }
    let cross: Vec<_> = groups
        .iter()
        .filter(|(_, g)| loads(g).iter().any(|l| l.latency_cross_instance.is_some()))
        .collect();
    if !cross.is_empty() {
        out.push_str("| point | poll interval ms | same-instance p50 / p99 ms | cross-instance p50 / p99 ms |\n");
        out.push_str("|---|---|---|---|\n");
        for (key, g) in cross {
            let runs = loads(g);
            let lat = |same: bool, p99: bool| {
                median(
                    runs.iter()
                        .filter_map(|r| {
                            let l = if same {
                                r.latency_same_instance.as_ref()
                            } else {
                                r.latency_cross_instance.as_ref()
                            }?;
                            Some(if p99 { l.p99_ms } else { l.p50_ms })
                        })
                        .collect(),
                )
            };
            let interval = g[0]
                .poll_interval_ms
                .map_or("-".to_owned(), |v| v.to_string());
            out.push_str(&format!(
                "| {key} | {interval} | {:.2} / {:.2} | {:.2} / {:.2} |\n",
                lat(true, false),
                lat(true, true),
                lat(false, false),
                lat(false, true)
            ));
        }
        out.push('\n');
    }
    let mut idle_rows = String::new();
    for (key, g) in &groups {
        let mut kinds: Vec<(String, usize, Vec<f64>)> = Vec::new();
        for r in g {
            if let Outcome::Idle { results } = &r.outcome {
                for i in results {
                    let Some(kib) = i.kib_per_connection else {
                        continue;
                    };
                    match kinds.iter_mut().find(|(t, _, _)| *t == i.transport) {
                        Some((_, _, v)) => v.push(kib),
                        None => kinds.push((i.transport.clone(), i.connections, vec![kib])),
                    }
                }
            }
        }
        for (kind, conns, values) in kinds {
            idle_rows.push_str(&format!(
                "| {key} | {kind} | {} | {conns} | {:.2} |\n",
                values.len(),
                median(values)
            ));
        }
    }
    if !idle_rows.is_empty() {
        out.push_str(
            "| point | connection | runs | connections | server RSS KiB per connection |\n",
        );
        out.push_str("|---|---|---|---|---|\n");
        out.push_str(&idle_rows);
        out.push('\n');
    }
    let mut saturate_rows = String::new();
    for (key, g) in &groups {
        let runs: Vec<_> = g
            .iter()
            .filter_map(|r| match &r.outcome {
                Outcome::Saturate(s) => Some(s),
                _ => None,
            })
            .collect();
        if runs.is_empty() {
            continue;
        }
        let members = runs[0].steps.first().map_or(0, |s| s.connections);
        saturate_rows.push_str(&format!(
            "| {key} | {} | {members} | {:.0} | {:.0} | {:.0} | {:.0} | {} |\n",
            runs.len(),
            median(runs.iter().map(|s| s.highest_sustained_rate).collect()),
            median(
                runs.iter()
                    .map(|s| s.highest_sustained_deliveries_per_s)
                    .collect()
            ),
            median(runs.iter().map(|s| s.highest_rate_keeping_up).collect()),
            median(
                runs.iter()
                    .map(|s| s.highest_keeping_up_deliveries_per_s)
                    .collect()
            ),
            runs.iter()
                .map(|s| s.stopped_because.as_str())
                .collect::<Vec<_>>()
                .join("; ")
        ));
    }
    if !saturate_rows.is_empty() {
        out.push_str("| point | runs | connections | highest msg/s within the p99 bound | deliveries/s there | highest msg/s keeping up | deliveries/s there | stopped because (each run) |\n");
        out.push_str("|---|---|---|---|---|---|---|---|\n");
        out.push_str(&saturate_rows);
        out.push('\n');
    }
    let mut persist_rows = String::new();
    for (key, g) in &groups {
        let runs: Vec<_> = g
            .iter()
            .filter_map(|r| match &r.outcome {
                Outcome::Persist(p) => Some(p),
                _ => None,
            })
            .collect();
        if runs.is_empty() {
            continue;
        }
        let m = |f: fn(&crate::bus::drain::DrainResult) -> f64| {
            median(runs.iter().map(|r| f(r)).collect())
        };
        persist_rows.push_str(&format!(
            "| {key} | {} | {:.0} | {:.0} | {:.1} | {:.4} |\n",
            runs.len(),
            m(|r| r.messages as f64),
            m(|r| r.messages_per_s),
            m(|r| r.mean_commit_ms),
            m(|r| r.redis_commands_per_message),
        ));
    }
    if !persist_rows.is_empty() {
        out.push_str("| point | runs | messages | stored msg/s | mean commit ms | Redis commands per message stored |\n");
        out.push_str("|---|---|---|---|---|---|\n");
        out.push_str(&persist_rows);
        out.push('\n');
    }
    out
}

/// Median p50 and p99 per offered rate over every `saturate` step.
fn latency_by_rate(reports: &[Report]) -> Vec<(f64, f64, f64)> {
    let mut by_rate: Vec<(f64, Vec<f64>, Vec<f64>)> = Vec::new();
    for r in reports {
        if let Outcome::Saturate(s) = &r.outcome {
            for step in &s.steps {
                match by_rate.iter_mut().find(|(rate, _, _)| *rate == step.rate) {
                    Some((_, p50, p99)) => {
                        p50.push(step.latency.p50_ms);
                        p99.push(step.latency.p99_ms);
                    }
                    None => by_rate.push((
                        step.rate,
                        vec![step.latency.p50_ms],
                        vec![step.latency.p99_ms],
                    )),
                }
            }
        }
    }
    by_rate.sort_by(|a, b| a.0.total_cmp(&b.0));
    by_rate
        .into_iter()
        .map(|(rate, p50, p99)| (rate, median(p50), median(p99)))
        .collect()
}

/// Median cross-instance p50 and p99 per poll interval over `cluster` runs.
fn latency_by_interval(reports: &[Report]) -> Vec<(f64, f64, f64)> {
    let mut by: Vec<(f64, Vec<f64>, Vec<f64>)> = Vec::new();
    for r in reports {
        let (Some(interval), Outcome::Load(l)) = (r.poll_interval_ms, &r.outcome) else {
            continue;
        };
        let lat = l.latency_cross_instance.as_ref().unwrap_or(&l.latency);
        let x = interval as f64;
        match by.iter_mut().find(|(i, _, _)| *i == x) {
            Some((_, p50, p99)) => {
                p50.push(lat.p50_ms);
                p99.push(lat.p99_ms);
            }
            None => by.push((x, vec![lat.p50_ms], vec![lat.p99_ms])),
        }
    }
    by.sort_by(|a, b| a.0.total_cmp(&b.0));
    by.into_iter()
        .map(|(x, p50, p99)| (x, median(p50), median(p99)))
        .collect()
}

/// Draws the two panels into an SVG file.
pub fn chart(reports: &[Report], path: &Path) -> anyhow::Result<()> {
    let plot = |e: &dyn std::fmt::Display| anyhow!("could not draw {}: {e}", path.display());
    let root = SVGBackend::new(path, (1000, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot(&e))?;
    let (left, right) = root.split_horizontally(500);
    panel(
        &left,
        "Fan-out latency by rate (saturate)",
        "messages/s offered",
        &latency_by_rate(reports),
        false,
    )
    .map_err(|e| plot(&e))?;
    panel(
        &right,
        "Poll bus: cross-instance latency",
        "poll interval, ms",
        &latency_by_interval(reports),
        true,
    )
    .map_err(|e| plot(&e))?;
    root.present().map_err(|e| plot(&e))?;
    Ok(())
}

/// A named, coloured line.
type Series = (&'static str, RGBColor, Vec<(f64, f64)>);

type Area<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn panel(
    area: &Area<'_>,
    title: &str,
    x_desc: &str,
    points: &[(f64, f64, f64)],
    with_interval: bool,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    if points.is_empty() {
        area.titled(title, ("sans-serif", 18))?.draw_text(
            "no data",
            &("sans-serif", 16).into_text_style(area),
            (200, 180),
        )?;
        return Ok(());
    }
    let x_max = points.iter().map(|p| p.0).fold(0.0, f64::max) * 1.1;
    let y_max = points
        .iter()
        .map(|p| p.2.max(if with_interval { p.0 } else { 0.0 }))
        .fold(0.0, f64::max)
        * 1.5;
    let y_min = points
        .iter()
        .map(|p| p.1)
        .fold(f64::MAX, f64::min)
        .max(0.01)
        * 0.7;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..x_max, (y_min..y_max.max(y_min * 2.0)).log_scale())?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc("latency, ms (log)")
        .draw()?;
    let series: [Series; 2] = [
        ("p50", BLUE, points.iter().map(|p| (p.0, p.1)).collect()),
        ("p99", RED, points.iter().map(|p| (p.0, p.2)).collect()),
    ];
    for (name, color, data) in series {
        chart
            .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)).point_size(3))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    if with_interval {
        let line: Vec<(f64, f64)> = points.iter().map(|p| (p.0, p.0)).collect();
        chart
            .draw_series(LineSeries::new(line, BLACK.mix(0.4)))?
            .label("poll interval")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK.mix(0.4)));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::{Latency, SaturateResult};

    fn load(label: &str, p99: f64) -> Report {
        Report {
            workload: "fanout".into(),
            label: Some(label.into()),
            poll_interval_ms: None,
            command: String::new(),
            outcome: Outcome::Load(Box::new(LoadResult {
                rate: 200.0,
                latency: Latency {
                    p99_ms: p99,
                    ..Latency::default()
                },
                ..LoadResult::default()
            })),
        }
    }

    #[test]
    fn medians_of_three_runs_per_label() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0]), 2.5);
        let reports = vec![
            load("a", 1.0),
            load("a", 9.0),
            load("a", 2.0),
            load("b", 7.0),
        ];
        let md = markdown(&reports);
        assert!(md.contains("| a | 3 |"), "{md}");
        assert!(md.contains("| 2.000 |"), "median p99 of a: {md}");
        assert!(md.contains("| b | 1 |"), "{md}");
    }

    #[test]
    fn the_chart_is_an_svg() {
        let step = |rate: f64, p99: f64| LoadResult {
            rate,
            latency: Latency {
                p50_ms: p99 / 2.0,
                p99_ms: p99,
                ..Latency::default()
            },
            ..LoadResult::default()
        };
        let reports = vec![Report {
            workload: "saturate".into(),
            label: None,
            poll_interval_ms: None,
            command: String::new(),
            outcome: Outcome::Saturate(SaturateResult {
                steps: vec![step(100.0, 1.0), step(150.0, 3.0)],
                ..SaturateResult::default()
            }),
        }];
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.svg");
        chart(&reports, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..50.min(svg.len())]);
        assert!(svg.contains("p99"));
    }
}
