"""Turn a sweep's MLflow runs into robustness heatmaps, fine-tuning curves and a markdown summary.

Reads MLflow with pandas and plots with matplotlib; imports neither torch nor ray, so it runs anywhere
the tracking store is reachable. Modules (each also a CLI, ``python -m analysis.<name> --help``):

- ``analysis.runs``      MLflow runs -> typed tables (attack trials, curves, protect, pretrain)
- ``analysis.tables``    attack trials -> cells (seed means per recipe), varying settings, sections, base slices
- ``analysis.cli``       the command-line arguments every part shares (where the sweep is, where output goes)
- ``analysis.heatmaps``  optimizer x lr (and batch size x lr) grids of final restricted accuracy
- ``analysis.curves``    restricted accuracy vs epoch, protected vs normal vs scratch
- ``analysis.summary``   intactness, robustness summary and a per-cell table, as markdown
- ``analysis.search``    the adaptive attacker: best attack found after n trials, final picks, worst-case gap,
                         what the search explored
- ``analysis.budget``    budget study (delay or wall: break-even epochs per data fraction) and benign fine-tuning
- ``analysis.html``      all of it as one self-contained page (report.html: images embedded, inline CSS)
- ``analysis.contents``  what a report holds: the sweep read once, FIGURES (every figure) and TABLES (every table,
                         written as tables/<name>.csv)
- ``analysis.report``    all of these, written to a folder and logged to the sweep's parent run (a ReportResult)
"""
