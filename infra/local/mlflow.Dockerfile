# MLflow tracking server for the local stack (infra/local/docker-compose.yml builds it): the official image
# plus the PostgreSQL driver (backend store) and boto3 (artifacts proxied to MinIO). Runs as a non-root user.
FROM ghcr.io/mlflow/mlflow:v3.17.2

RUN pip install --no-cache-dir psycopg2-binary==2.9.11 boto3==1.44.8 \
    && useradd --create-home --uid 1001 --user-group mlflow

USER 1001:1001
WORKDIR /home/mlflow
