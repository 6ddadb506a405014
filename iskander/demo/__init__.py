"""The demo model set served when no --config is given (built by ``iskander.demo.build``)."""
