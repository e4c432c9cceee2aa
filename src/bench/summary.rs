//! `bench report`: reads JSON results, groups them by label, and prints the
//! medians as markdown tables; with `--svg`, draws latency by rate (from
//! `saturate`), cross-instance latency by poll interval (from `cluster`) and,
//! for servers compared under one load, p99 and CPU per delivery by rate.
//!
//! A label `POINT | SERVER` marks one server's runs of a point that several
//! servers ran (baby-discord and a baseline): the comparison panels draw one
//! line per server from such `saturate` runs.

use std::path::Path;

use anyhow::{Context, anyhow};
use plotters::coord::types::RangedCoordf64;
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
        out.push_str("| point | runs | connections | msg/s offered | deliveries/s | p50 ms | p99 ms | p99.9 ms | max ms | lost | duplicates | server CPU µs/delivery (user) | server CPU busy | generator CPU busy | deliveries per read |\n");
        out.push_str("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
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
            let per_read = if runs.iter().all(|r| r.deliveries_per_read.is_some()) {
                format!("{:.2}", m(|r| r.deliveries_per_read.unwrap_or(0.0)))
            } else {
                "-".to_owned()
            };
            out.push_str(&format!(
                "| {key} | {} | {:.0} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.0} | {:.0} | {cpu} | {server_busy} | {generator_busy} | {per_read} |\n",
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

/// The server of a `POINT | SERVER` label.
fn compared_server(report: &Report) -> Option<&str> {
    let label = report.label.as_deref()?;
    label.rsplit_once(" | ").map(|(_, server)| server.trim())
}

/// Median p50 and p99 per offered rate over every `saturate` step, except
/// those of compared servers (they have panels of their own).
fn latency_by_rate(reports: &[Report]) -> Vec<(f64, f64, f64)> {
    let mut by_rate: Vec<(f64, Vec<f64>, Vec<f64>)> = Vec::new();
    for r in reports.iter().filter(|r| compared_server(r).is_none()) {
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

/// One compared server's `saturate` steps: median p99 and median CPU µs per
/// delivery at each offered rate.
struct ServerCurve {
    server: String,
    p99: Vec<(f64, f64)>,
    cpu: Vec<(f64, f64)>,
}

/// The curves of every compared server, in first-seen order.
fn curves_by_server(reports: &[Report]) -> Vec<ServerCurve> {
    type Steps = Vec<(f64, Vec<f64>, Vec<f64>)>;
    let mut servers: Vec<(String, Steps)> = Vec::new();
    for r in reports {
        let (Some(server), Outcome::Saturate(s)) = (compared_server(r), &r.outcome) else {
            continue;
        };
        let at = match servers.iter().position(|(name, _)| name == server) {
            Some(at) => at,
            None => {
                servers.push((server.to_owned(), Vec::new()));
                servers.len() - 1
            }
        };
        let steps = &mut servers[at].1;
        for step in &s.steps {
            let cpu = step.server.as_ref().map(|u| u.cpu_us_per_delivery);
            let at = match steps.iter().position(|(rate, _, _)| *rate == step.rate) {
                Some(at) => at,
                None => {
                    steps.push((step.rate, Vec::new(), Vec::new()));
                    steps.len() - 1
                }
            };
            steps[at].1.push(step.latency.p99_ms);
            steps[at].2.extend(cpu);
        }
    }
    servers
        .into_iter()
        .map(|(server, mut steps)| {
            steps.sort_by(|a, b| a.0.total_cmp(&b.0));
            let p99 = steps.iter().map(|(x, p, _)| (*x, median(p.clone())));
            let cpu = steps
                .iter()
                .filter(|(_, _, c)| !c.is_empty())
                .map(|(x, _, c)| (*x, median(c.clone())));
            ServerCurve {
                server,
                p99: p99.collect(),
                cpu: cpu.collect(),
            }
        })
        .collect()
}

/// Draws the panels into an SVG file: two, or four when servers were compared.
pub fn chart(reports: &[Report], path: &Path) -> anyhow::Result<()> {
    let plot = |e: &dyn std::fmt::Display| anyhow!("could not draw {}: {e}", path.display());
    let curves = curves_by_server(reports);
    let height = if curves.is_empty() { 420 } else { 840 };
    let root = SVGBackend::new(path, (1000, height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot(&e))?;
    let (top, bottom) = root.split_vertically(420);
    let (left, right) = top.split_horizontally(500);
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
    if !curves.is_empty() {
        let (left, right) = bottom.split_horizontally(500);
        let p99 = curves.iter().map(|c| (c.server.as_str(), &c.p99[..]));
        compare(&left, "p99 latency by rate", "p99, ms (log)", p99).map_err(|e| plot(&e))?;
        let cpu = curves.iter().map(|c| (c.server.as_str(), &c.cpu[..]));
        compare(&right, "Server CPU per delivery by rate", "µs (log)", cpu)
            .map_err(|e| plot(&e))?;
    }
    root.present().map_err(|e| plot(&e))?;
    Ok(())
}

/// One panel with a line per compared server, over messages/s offered, on a
/// log scale (the servers may differ tenfold).
fn compare<'a>(
    area: &Area<'_>,
    title: &str,
    y_desc: &str,
    lines: impl Iterator<Item = (&'a str, &'a [(f64, f64)])> + Clone,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let all = || lines.clone().flat_map(|(_, points)| points.iter());
    let x_max = all().map(|p| p.0).fold(1.0, f64::max) * 1.1;
    let y_max = all().map(|p| p.1).fold(0.01, f64::max) * 1.5;
    let y_min = all().map(|p| p.1).fold(f64::MAX, f64::min).max(0.01) * 0.7;
    let mut caption = ChartBuilder::on(area);
    caption
        .caption(format!("{title} (saturate)"), ("sans-serif", 18))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(55);
    let mut chart =
        caption.build_cartesian_2d(0.0..x_max, (y_min..y_max.max(y_min * 2.0)).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("messages/s offered")
        .y_desc(y_desc)
        .draw()?;
    draw_lines(&mut chart, lines)
}

/// Draws one coloured line per server, with a legend.
fn draw_lines<'a, 'b, Y: Ranged<ValueType = f64>>(
    chart: &mut ChartContext<'b, SVGBackend<'b>, Cartesian2d<RangedCoordf64, Y>>,
    lines: impl Iterator<Item = (&'a str, &'a [(f64, f64)])>,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    const COLORS: [RGBColor; 4] = [RED, BLUE, GREEN, MAGENTA];
    for ((server, points), color) in lines.zip(COLORS.iter().cycle()) {
        let color = *color;
        chart
            .draw_series(
                LineSeries::new(points.iter().copied(), color.stroke_width(2)).point_size(3),
            )?
            .label(server)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
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
        assert!(
            !svg.contains("CPU per delivery"),
            "no compared servers, no panel"
        );
    }

    #[test]
    fn compared_servers_get_a_line_each() {
        use crate::bench::report::ServerUsage;
        let step = |rate: f64, p99: f64, cpu: f64| LoadResult {
            rate,
            latency: Latency {
                p99_ms: p99,
                ..Latency::default()
            },
            server: Some(ServerUsage {
                cpu_us_per_delivery: cpu,
                ..ServerUsage::default()
            }),
            ..LoadResult::default()
        };
        let saturate = |label: &str, steps| Report {
            workload: "saturate".into(),
            label: Some(label.into()),
            poll_interval_ms: None,
            command: String::new(),
            outcome: Outcome::Saturate(SaturateResult {
                steps,
                ..SaturateResult::default()
            }),
        };
        let reports = vec![
            saturate(
                "sat | one",
                vec![step(100.0, 1.0, 3.0), step(150.0, 2.0, 2.5)],
            ),
            saturate("sat | two", vec![step(100.0, 4.0, 2.0)]),
            saturate("sat | one", vec![step(100.0, 3.0, 5.0)]),
        ];
        let curves = curves_by_server(&reports);
        assert_eq!(curves.len(), 2);
        assert_eq!(curves[0].server, "one");
        assert_eq!(
            curves[0].p99,
            vec![(100.0, 2.0), (150.0, 2.0)],
            "medians by rate"
        );
        assert_eq!(curves[0].cpu, vec![(100.0, 4.0), (150.0, 2.5)]);
        assert_eq!(curves[1].p99, vec![(100.0, 4.0)]);
        assert!(
            latency_by_rate(&reports).is_empty(),
            "compared runs stay apart"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chart.svg");
        chart(&reports, &path).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(
            svg.contains("CPU per delivery") && svg.contains("two"),
            "both panels"
        );
    }
}
