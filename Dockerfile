# One image for every role: the CLI, Celery workers, beat and the tracker.
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY mailer ./mailer
COPY worker ./worker
COPY templates ./templates
RUN pip install --no-cache-dir -e . flower
ENV MAILER_DATABASE_URL=postgresql://mailer@postgres:5432/mailer \
    MAILER_BROKER_URL=redis://redis:6379/0
ENTRYPOINT ["mailer"]
CMD ["--help"]
