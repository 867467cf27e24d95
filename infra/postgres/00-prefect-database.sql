-- docker-compose's PostgreSQL holds two databases: korokoro (POSTGRES_DB: the products queue,
-- infra/supabase/001_products_queue.sql is applied to it next) and prefect (the Prefect server's).
CREATE DATABASE prefect;
