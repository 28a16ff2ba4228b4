//! Latency distributions of one or two reports (before / after) as SVG plots, one per figure.

use std::path::{Path, PathBuf};

use anyhow::Context;
use plotters::prelude::*;

use super::report::{ClaimPhase, ClaimSample, Report};

/// One plotted figure: which samples of a report it shows.
pub struct Figure {
    /// File stem of the SVG.
    pub id: &'static str,
    pub title: &'static str,
    pub samples: fn(&Report) -> Option<Vec<f64>>,
}

fn normal_phase(
    report: &Report,
    phase: fn(&super::report::RunFigures) -> &ClaimPhase,
) -> Option<Vec<ClaimSample>> {
    let normal = report.normal.as_ref()?;
    let samples: Vec<ClaimSample> = normal
        .runs
        .iter()
        .flat_map(|r| phase(r).samples.iter().copied())
        .collect();
    (!samples.is_empty()).then_some(samples)
}

fn scale_phase(
    report: &Report,
    phase: fn(&super::report::RunFigures) -> &ClaimPhase,
) -> Option<Vec<ClaimSample>> {
    let samples = phase(&report.scale.as_ref()?.run).samples.clone();
    (!samples.is_empty()).then_some(samples)
}

fn map(samples: Option<Vec<ClaimSample>>, f: fn(&ClaimSample) -> f64) -> Option<Vec<f64>> {
    samples.map(|s| s.iter().map(f).collect())
}

/// The figures that are plotted, in order.
pub const FIGURES: &[Figure] = &[
    Figure {
        id: "burst-total",
        title: "100 concurrent claims: create -> allocated with endpoint",
        samples: |r| map(normal_phase(r, |p| &p.burst), ClaimSample::total_ms),
    },
    Figure {
        id: "burst-api",
        title: "100 concurrent claims: API server's share (create -> first watch event)",
        samples: |r| map(normal_phase(r, |p| &p.burst), |s| s.api_ms),
    },
    Figure {
        id: "burst-controller",
        title: "100 concurrent claims: controller's share (first watch event -> allocated)",
        samples: |r| map(normal_phase(r, |p| &p.burst), |s| s.controller_ms),
    },
    Figure {
        id: "sequential-total",
        title: "Claims one at a time: create -> allocated with endpoint",
        samples: |r| map(normal_phase(r, |p| &p.sequential), ClaimSample::total_ms),
    },
    Figure {
        id: "scale-burst-total",
        title: "At scale, 100 concurrent claims: create -> allocated with endpoint",
        samples: |r| map(scale_phase(r, |p| &p.burst), ClaimSample::total_ms),
    },
    Figure {
        id: "scale-burst-controller",
        title: "At scale, 100 concurrent claims: controller's share",
        samples: |r| map(scale_phase(r, |p| &p.burst), |s| s.controller_ms),
    },
    Figure {
        id: "scale-sequential-total",
        title: "At scale, claims one at a time: create -> allocated with endpoint",
        samples: |r| map(scale_phase(r, |p| &p.sequential), ClaimSample::total_ms),
    },
];

/// The empirical CDF of `samples` as a step line: (value, fraction of samples <= value).
pub fn cdf(samples: &[f64]) -> Vec<(f64, f64)> {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len() as f64;
    sorted
        .iter()
        .enumerate()
        .flat_map(|(i, &x)| [(x, i as f64 / n), (x, (i + 1) as f64 / n)])
        .collect()
}

/// The series of one figure: (label, CDF points) for each report that has its samples.
pub fn series(figure: &Figure, reports: &[(String, Report)]) -> Vec<(String, Vec<(f64, f64)>)> {
    reports
        .iter()
        .filter_map(|(label, report)| {
            let samples = (figure.samples)(report)?;
            Some((format!("{label} (n={})", samples.len()), cdf(&samples)))
        })
        .collect()
}

const COLORS: [RGBColor; 4] = [BLUE, RED, GREEN, MAGENTA];

/// Writes `<out>/<figure>.svg` for every figure with data; returns the files written.
pub fn render(reports: &[(String, Report)], out: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut written = Vec::new();
    for figure in FIGURES {
        let series = series(figure, reports);
        if series.is_empty() {
            continue;
        }
        let path = out.join(format!("{}.svg", figure.id));
        draw(&path, figure.title, &series)
            .with_context(|| format!("drawing {}", path.display()))?;
        written.push(path);
    }
    Ok(written)
}

fn draw(path: &Path, title: &str, series: &[(String, Vec<(f64, f64)>)]) -> anyhow::Result<()> {
    let x_max = series
        .iter()
        .flat_map(|(_, points)| points.iter().map(|p| p.0))
        .fold(0.0, f64::max);
    let x_max = if x_max > 0.0 { x_max * 1.05 } else { 1.0 };
    let root = SVGBackend::new(path, (800, 450)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..x_max, 0f64..1f64)?;
    chart
        .configure_mesh()
        .x_desc("latency (ms)")
        .y_desc("fraction of claims (CDF)")
        .draw()?;
    for (i, (label, points)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        chart
            .draw_series(LineSeries::new(
                points.iter().copied(),
                color.stroke_width(2),
            ))?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::{NormalReport, PhaseCost, RunFigures};

    #[test]
    fn cdf_is_a_step_line() {
        let points = cdf(&[3.0, 1.0, 2.0]);
        let third = 1.0 / 3.0;
        assert_eq!(
            points,
            vec![
                (1.0, 0.0),
                (1.0, third),
                (2.0, third),
                (2.0, 2.0 * third),
                (3.0, 2.0 * third),
                (3.0, 1.0)
            ]
        );
        assert!(cdf(&[]).is_empty());
    }

    fn report(api_ms: f64) -> Report {
        let samples = vec![
            ClaimSample {
                api_ms,
                controller_ms: 10.0,
                status_ready_ms: None,
            };
            4
        ];
        Report {
            normal: Some(NormalReport {
                runs: vec![RunFigures {
                    burst: ClaimPhase::new(samples, PhaseCost::default()),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn series_per_report_with_samples() {
        let reports = vec![
            ("before".to_owned(), report(5.0)),
            ("after".to_owned(), Report::default()),
        ];
        let burst = &FIGURES[0];
        let s = series(burst, &reports);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].0, "before (n=4)");
        assert_eq!(s[0].1.last(), Some(&(15.0, 1.0)));
        let sequential = FIGURES.iter().find(|f| f.id == "sequential-total").unwrap();
        assert!(series(sequential, &reports).is_empty());
    }

    #[test]
    fn renders_svg_for_figures_with_data() {
        let dir = tempfile::tempdir().unwrap();
        let reports = vec![
            ("before".to_owned(), report(5.0)),
            ("after".to_owned(), report(2.0)),
        ];
        let written = render(&reports, dir.path()).unwrap();
        let names: Vec<_> = written
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            ["burst-total.svg", "burst-api.svg", "burst-controller.svg"]
        );
        let svg = std::fs::read_to_string(&written[0]).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("before (n=4)") && svg.contains("after (n=4)"));
        assert!(svg.contains("<polyline"));
    }
}
