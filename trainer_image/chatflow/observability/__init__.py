"""Watching ChatFlow runs: PromQL, the Grafana dashboard, alerting rules (and `chatflow report`).

queries.py     every PromQL expression, named: the single source for all of the below
dashboard.py   the Grafana dashboard, as code
rules.py       the alerting rules
generate.py    writes the dashboard and rules files (`python -m chatflow.observability`)
prometheus.py  a client of Prometheus' query API, for the report and the tests
"""
