"""After a study: report, export, uncertainty, inspector, dashboard, predict and serve."""
