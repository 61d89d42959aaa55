"""How results are shown: tables, plots and the HTML report."""
