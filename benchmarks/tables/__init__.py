"""Tables: the cost table (bench.py cost), paper tables (reproduce) and the numbers the papers report (references/)."""
