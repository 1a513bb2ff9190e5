"""The eval stage: validation loss, the base-vs-SFT stop table, exact match, report.json/report.md."""
