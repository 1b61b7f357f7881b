// The type every dashboard in ../dashboards must satisfy: Grafana's own `Dashboard` (schema v1,
// the JSON model a file-provisioned dashboard uses) from @grafana/schema, with two adjustments
// that keep it faithful to what Grafana accepts from a JSON file:
//
// 1. Enum-typed fields (ThresholdsMode, FieldColorModeId, MappingType, ...) are declared as
//    TypeScript string enums, which a plain string literal never satisfies. `AsJson` maps every
//    string enum to the union of its values, so "absolute" is accepted and "absolut" is not.
//    Numeric enums are left as they are (TypeScript checks a number literal against their members).
// 2. Grafana's CUE schema leaves AnnotationQuery open (`...`) so that datasources may keep their
//    own fields next to the base ones; the generated TypeScript closes it. We reopen it for exactly
//    the Prometheus annotation fields, and nothing else.
//
// On top of Grafana's schema we add one rule of our own: every query (panel target and annotation
// target) is a Prometheus query with an `expr`, since the PromQL test in tests/it/dashboards.rs
// and the demo rely on every panel being backed by PromQL. @grafana/schema types a panel target
// as an open record, so `PromQuery` below (the fields of Grafana's Prometheus query model that
// these dashboards use) is what makes a misspelt `expr` or `legendFormat` fail the check.
import type { AnnotationQuery, DataQuery, Dashboard, Panel, RowPanel } from '@grafana/schema';

type AsJson<T> = T extends string
  ? `${T}`
  : T extends number | boolean | null | undefined
    ? T
    : T extends ReadonlyArray<infer U>
      ? Array<AsJson<U>>
      : T extends object
        ? { [K in keyof T]: AsJson<T[K]> }
        : T;

/** A Prometheus query as Grafana stores it in a panel or annotation target. */
interface PromQuery extends DataQuery {
  expr: string;
  legendFormat?: string;
  range?: boolean;
  instant?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  interval?: string;
  intervalFactor?: number;
  exemplar?: boolean;
  editorMode?: 'code' | 'builder';
}

type CheckedPanel = AsJson<Omit<Panel, 'targets'>> & { targets: Array<AsJson<PromQuery>> };
type CheckedRow = AsJson<Omit<RowPanel, 'panels'>> & { panels: CheckedPanel[] };

/** Fields the Prometheus datasource reads from an annotation query next to `target`. */
interface PrometheusAnnotationFields {
  titleFormat?: string;
  textFormat?: string;
  tagKeys?: string;
  useValueForTime?: boolean;
}

export type CheckedDashboard = AsJson<Omit<Dashboard, 'annotations' | 'panels'>> & {
  panels: Array<CheckedPanel | CheckedRow>;
  annotations?: {
    list?: Array<AsJson<AnnotationQuery<PromQuery>> & PrometheusAnnotationFields>;
  };
};
