"""What runs beside the server, not in it: the records tool, the load tester, and a twistd child-process helper."""
