"""Load testing primecount with Apache JMeter: run the plan headless, summarise the results, report."""
